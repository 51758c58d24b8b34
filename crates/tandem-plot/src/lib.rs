//! Charts of benchmark and planner results, as PNG and SVG.
//!
//! Inputs are plain data (no Tandem types), so `tandem bench trace --plot` and `tandem plan`
//! fill them from whatever they measured or simulated. One function per chart; each returns a
//! [`Chart`] holding both encodings of the same drawing.
//!
//! Sizes suit a laptop screen: 1200×700 px, tick labels 22 px high and titles 36 px.
//!
//! Everything is pure Rust: plotters' bitmap and SVG backends, text measured and rasterised with
//! `ab_glyph` from the DejaVu Sans file shipped in `fonts/` (`text.rs`; no fontconfig, no
//! freetype, no process-wide font table), and the `png` crate to encode the bitmap in memory.

use std::path::{Path, PathBuf};

use plotters::coord::Shift;
use plotters::prelude::*;

mod charts;
mod text;

pub use charts::{engine_load, goodput_vs_split, latency_cdf, phase_bars};

/// Pixel size of every chart.
pub const WIDTH: u32 = 1200;
pub const HEIGHT: u32 = 700;

/// The family every text element names: the SVG's viewer draws it with its own sans-serif (the
/// PNG's text is the embedded DejaVu Sans, which the layout of both is measured with).
const FAMILY: &str = "sans-serif";

/// One chart in both formats.
#[derive(Debug, Clone)]
pub struct Chart {
    pub png: Vec<u8>,
    pub svg: String,
}

impl Chart {
    /// Write `DIR/NAME.png` and `DIR/NAME.svg`; returns the two paths.
    pub fn write(&self, dir: &Path, name: &str) -> std::io::Result<[PathBuf; 2]> {
        let png = dir.join(format!("{name}.png"));
        let svg = dir.join(format!("{name}.svg"));
        std::fs::write(&png, &self.png)?;
        std::fs::write(&svg, &self.svg)?;
        Ok([png, svg])
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("nothing to plot: {0}")]
    Empty(&'static str),
    #[error("drawing failed: {0}")]
    Draw(String),
    #[error("PNG encoding failed: {0}")]
    Encode(#[from] png::EncodingError),
}

impl<E: std::error::Error + Send + Sync> From<DrawingAreaErrorKind<E>> for PlotError {
    fn from(e: DrawingAreaErrorKind<E>) -> Self {
        PlotError::Draw(e.to_string())
    }
}

/// A drawing that can go to any backend: each chart implements it once, and [`render`] runs it
/// on the SVG and the bitmap backend.
trait Draw {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), PlotError>
    where
        DB::ErrorType: 'static;
}

fn render(d: &impl Draw) -> Result<Chart, PlotError> {
    let mut svg = String::new();
    {
        let root = text::Texted::vector(SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)))
            .into_drawing_area();
        d.draw(&root)?;
        root.present()?;
    }
    let mut rgb = vec![0u8; (WIDTH * HEIGHT * 3) as usize];
    {
        let root = text::Texted::raster(BitMapBackend::with_buffer(&mut rgb, (WIDTH, HEIGHT)))
            .into_drawing_area();
        d.draw(&root)?;
        root.present()?;
    }
    let mut png = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut png, WIDTH, HEIGHT);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        // Charts are written once and kept (benches/ commits them): size over speed.
        enc.set_compression(png::Compression::Best);
        enc.set_filter(png::FilterType::Paeth);
        let mut w = enc.write_header()?;
        w.write_image_data(&rgb)?;
    }
    Ok(Chart { png, svg })
}

// Text heights, px (ascender to descender, `text.rs`): readable at 1200×700 on a laptop
// without zooming.
const TITLE: u32 = 36;
const AXIS: u32 = 26;
const TICKS: u32 = 22;
const LEGEND: u32 = 22;

/// Distinct colours that stay apart on white, for series, engines and phases.
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

fn colour(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

/// A point on the goodput-per-GPU curve: one P:D split.
#[derive(Debug, Clone, PartialEq)]
pub struct SplitPoint {
    /// The x-axis label; `None` gives `"{prefill}P+{decode}D"`.
    pub label: Option<String>,
    pub prefill: u32,
    pub decode: u32,
    /// Goodput (requests per second within the SLO) divided by the split's GPUs.
    pub goodput_per_gpu: f64,
}

impl SplitPoint {
    pub fn label(&self) -> String {
        self.label
            .clone()
            .unwrap_or_else(|| format!("{}P+{}D", self.prefill, self.decode))
    }
}

/// Goodput per GPU against the P:D split, with the colocated baseline on the same GPUs.
#[derive(Debug, Clone, PartialEq)]
pub struct SplitCurve {
    pub title: String,
    /// Left to right, as given.
    pub points: Vec<SplitPoint>,
    /// Colocated (every engine does both phases) goodput per GPU, drawn as a horizontal line.
    pub colocated_per_gpu: Option<f64>,
    /// Y-axis unit, e.g. "req/s per GPU".
    pub unit: String,
}

/// Samples of one latency for one policy (any order; non-finite values are dropped).
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub name: String,
    pub values: Vec<f64>,
}

/// Cumulative distributions of one latency (TTFT or TPOT), one line per policy.
#[derive(Debug, Clone, PartialEq)]
pub struct CdfChart {
    pub title: String,
    /// X-axis description, with its unit, e.g. "TTFT (ms)".
    pub x_label: String,
    pub series: Vec<Series>,
    /// A vertical dashed line at the objective, e.g. the TTFT SLO.
    pub slo: Option<f64>,
}

/// One stacked bar: the mean (or median) of each phase, in [`PhaseChart::phases`] order.
#[derive(Debug, Clone, PartialEq)]
pub struct PhaseBar {
    pub label: String,
    pub values: Vec<f64>,
}

/// Where the time to first token went, per policy: one stacked bar each.
#[derive(Debug, Clone, PartialEq)]
pub struct PhaseChart {
    pub title: String,
    /// Phase names, bottom to top (e.g. queue, prefill, handoff, decode first token).
    pub phases: Vec<String>,
    pub bars: Vec<PhaseBar>,
    /// Y-axis description with unit, e.g. "mean ms".
    pub y_label: String,
}

/// One engine's load at points in time (seconds from the run's start).
#[derive(Debug, Clone, PartialEq)]
pub struct EngineLoad {
    pub engine: String,
    pub points: Vec<(f64, f64)>,
}

/// Each engine's load over a run, one line per engine.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadChart {
    pub title: String,
    /// Y-axis description, e.g. "requests in flight".
    pub y_label: String,
    pub engines: Vec<EngineLoad>,
}

#[cfg(test)]
mod tests;
