//! The four charts. Each is a [`Draw`] over its input, rendered to both backends by `render`.

use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::{
    colour, render, CdfChart, Chart, Draw, LoadChart, PhaseChart, PlotError, SplitCurve,
    SplitPoint, AXIS, FAMILY, LEGEND, TICKS, TITLE,
};

/// Goodput per GPU for each P:D split as bars, the colocated baseline as a dashed line.
pub fn goodput_vs_split(c: &SplitCurve) -> Result<Chart, PlotError> {
    if c.points.is_empty() {
        return Err(PlotError::Empty("no P:D splits"));
    }
    render(&SplitDraw(c))
}

/// TTFT or TPOT cumulative distributions, one line per policy.
pub fn latency_cdf(c: &CdfChart) -> Result<Chart, PlotError> {
    if c.series.iter().all(|s| finite(&s.values).is_empty()) {
        return Err(PlotError::Empty("no latency samples"));
    }
    render(&CdfDraw(c))
}

/// Per-phase TTFT as stacked bars, one bar per policy.
pub fn phase_bars(c: &PhaseChart) -> Result<Chart, PlotError> {
    if c.bars.is_empty() || c.phases.is_empty() {
        return Err(PlotError::Empty("no phases"));
    }
    render(&PhaseDraw(c))
}

/// Each engine's load over time, one line per engine.
pub fn engine_load(c: &LoadChart) -> Result<Chart, PlotError> {
    if c.engines.iter().all(|e| e.points.is_empty()) {
        return Err(PlotError::Empty("no engine load samples"));
    }
    render(&LoadDraw(c))
}

fn finite(v: &[f64]) -> Vec<f64> {
    v.iter().copied().filter(|x| x.is_finite()).collect()
}

/// A round upper bound a little above `v`, so the top bar or line never touches the frame.
fn headroom(v: f64) -> f64 {
    if v <= 0.0 || !v.is_finite() {
        return 1.0;
    }
    let v = v * 1.15;
    let mag = 10f64.powf(v.log10().floor());
    let step = [1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0]
        .into_iter()
        .find(|s| s * mag >= v)
        .unwrap_or(10.0);
    step * mag
}

/// Tick labels without trailing zeros ("500", "0.25").
fn tick(v: &f64) -> String {
    let s = format!("{v:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" {
        "0".into()
    } else {
        s.into()
    }
}

/// Labels for a categorical axis drawn on `-0.5..n-0.5`: the category's name at each integer.
fn category(labels: &[String], v: f64) -> String {
    let i = v.round();
    if (v - i).abs() > 1e-6 || i < 0.0 {
        return String::new();
    }
    labels.get(i as usize).cloned().unwrap_or_default()
}

fn legend<'a, DB: DrawingBackend + 'a>(
    chart: &mut ChartContext<'a, DB, Cartesian2d<RangedCoordf64, RangedCoordf64>>,
    at: SeriesLabelPosition,
) -> Result<(), PlotError>
where
    DB::ErrorType: 'static,
{
    chart
        .configure_series_labels()
        .position(at)
        .label_font((FAMILY, LEGEND))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK.mix(0.5))
        .margin(12)
        .draw()?;
    Ok(())
}

fn centred_above() -> TextStyle<'static> {
    TextStyle::from((FAMILY, TICKS).into_font()).pos(Pos::new(HPos::Center, VPos::Bottom))
}

struct SplitDraw<'a>(&'a SplitCurve);

impl Draw for SplitDraw<'_> {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), PlotError>
    where
        DB::ErrorType: 'static,
    {
        let c = self.0;
        root.fill(&WHITE)?;
        let n = c.points.len();
        let labels: Vec<String> = c.points.iter().map(SplitPoint::label).collect();
        let top = c
            .points
            .iter()
            .map(|p| p.goodput_per_gpu)
            .chain(c.colocated_per_gpu)
            .filter(|v| v.is_finite())
            .fold(0.0, f64::max);
        let mut chart = ChartBuilder::on(root)
            .caption(&c.title, (FAMILY, TITLE))
            .margin(24)
            .margin_right(48)
            .x_label_area_size(80)
            .y_label_area_size(100)
            .build_cartesian_2d(-0.5..n as f64 - 0.5, 0.0..headroom(top))?;
        let fmt = |v: &f64| category(&labels, *v);
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(n + 1)
            .x_label_formatter(&fmt)
            .x_desc("P:D split (prefill + decode engines)")
            .y_desc(c.unit.as_str())
            .y_label_formatter(&tick)
            .axis_desc_style((FAMILY, AXIS))
            .label_style((FAMILY, TICKS))
            .draw()?;
        let bar = colour(0);
        chart
            .draw_series(c.points.iter().enumerate().map(|(i, p)| {
                let x = i as f64;
                Rectangle::new(
                    [(x - 0.35, 0.0), (x + 0.35, p.goodput_per_gpu)],
                    bar.filled(),
                )
            }))?
            .label("P/D disaggregated")
            .legend(move |(x, y)| Rectangle::new([(x, y - 7), (x + 24, y + 7)], bar.filled()));
        chart.draw_series(c.points.iter().enumerate().map(|(i, p)| {
            Text::new(
                format!("{:.3}", p.goodput_per_gpu),
                (i as f64, p.goodput_per_gpu),
                centred_above(),
            )
        }))?;
        if let Some(y) = c.colocated_per_gpu.filter(|v| v.is_finite()) {
            let line = colour(3);
            chart
                .draw_series(DashedLineSeries::new(
                    [(-0.5, y), (n as f64 - 0.5, y)],
                    14,
                    8,
                    line.stroke_width(3),
                ))?
                .label(format!("colocated, same GPUs ({y:.3})"))
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 24, y)], line.stroke_width(3))
                });
        }
        legend(&mut chart, SeriesLabelPosition::UpperRight)
    }
}

/// An SLO more than this many times the largest sample is not drawn (see `CdfDraw`).
const SLO_OFF_AXIS: f64 = 2.5;

/// At most this many points per CDF line: enough for a smooth curve, small SVGs.
const CDF_POINTS: usize = 400;

/// A series' CDF as (value, percent of requests at or below it), thinned to [`CDF_POINTS`].
pub(crate) fn cdf_points(values: &[f64]) -> Vec<(f64, f64)> {
    let mut v = finite(values);
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return Vec::new();
    }
    let step = n.div_ceil(CDF_POINTS).max(1);
    let mut out: Vec<(f64, f64)> = (0..n)
        .step_by(step)
        .map(|i| (v[i], (i + 1) as f64 * 100.0 / n as f64))
        .collect();
    if out.last().is_some_and(|&(_, p)| p < 100.0) {
        out.push((v[n - 1], 100.0));
    }
    out
}

struct CdfDraw<'a>(&'a CdfChart);

impl Draw for CdfDraw<'_> {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), PlotError>
    where
        DB::ErrorType: 'static,
    {
        let c = self.0;
        root.fill(&WHITE)?;
        let lines: Vec<(&str, Vec<(f64, f64)>)> = c
            .series
            .iter()
            .map(|s| (s.name.as_str(), cdf_points(&s.values)))
            .collect();
        let data_hi = lines
            .iter()
            .flat_map(|(_, p)| p.last().map(|&(x, _)| x))
            .fold(0.0, f64::max);
        // An objective far above every sample would squeeze the curves into the left edge:
        // then it is named under the axis instead of drawn.
        let slo = c.slo.filter(|v| v.is_finite());
        let (slo_line, hi, x_label) = match slo {
            Some(s) if s > SLO_OFF_AXIS * data_hi => (
                None,
                data_hi,
                format!("{} (SLO {}: off the axis)", c.x_label, tick(&s)),
            ),
            _ => (slo, data_hi.max(slo.unwrap_or(0.0)), c.x_label.clone()),
        };
        let mut chart = ChartBuilder::on(root)
            .caption(&c.title, (FAMILY, TITLE))
            .margin(24)
            .margin_right(48)
            .x_label_area_size(70)
            .y_label_area_size(90)
            .build_cartesian_2d(0.0..headroom(hi), 0.0..100.0)?;
        chart
            .configure_mesh()
            .x_desc(x_label)
            .x_label_formatter(&tick)
            .y_desc("requests at or below (%)")
            .y_label_formatter(&tick)
            .axis_desc_style((FAMILY, AXIS))
            .label_style((FAMILY, TICKS))
            .light_line_style(BLACK.mix(0.05))
            .draw()?;
        for (i, (name, pts)) in lines.into_iter().enumerate() {
            let col = colour(i);
            chart
                .draw_series(LineSeries::new(pts, col.stroke_width(3)))?
                .label(name)
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 24, y)], col.stroke_width(3)));
        }
        if let Some(s) = slo_line {
            let col = BLACK.mix(0.6);
            chart
                .draw_series(DashedLineSeries::new(
                    [(s, 0.0), (s, 100.0)],
                    10,
                    8,
                    col.stroke_width(2),
                ))?
                .label(format!("SLO {}", tick(&s)))
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 24, y)], col.stroke_width(2)));
        }
        legend(&mut chart, SeriesLabelPosition::LowerRight)
    }
}

struct PhaseDraw<'a>(&'a PhaseChart);

impl Draw for PhaseDraw<'_> {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), PlotError>
    where
        DB::ErrorType: 'static,
    {
        let c = self.0;
        root.fill(&WHITE)?;
        let n = c.bars.len();
        let labels: Vec<String> = c.bars.iter().map(|b| b.label.clone()).collect();
        let total = |b: &crate::PhaseBar| -> f64 {
            b.values
                .iter()
                .filter(|v| v.is_finite())
                .map(|v| v.max(0.0))
                .sum()
        };
        let top = c.bars.iter().map(total).fold(0.0, f64::max);
        // Room on the right of the bars for the legend, which lists every phase.
        let mut chart = ChartBuilder::on(root)
            .caption(&c.title, (FAMILY, TITLE))
            .margin(24)
            .margin_right(48)
            .x_label_area_size(70)
            .y_label_area_size(100)
            .build_cartesian_2d(-0.5..n as f64 + 0.5, 0.0..headroom(top))?;
        let fmt = |v: &f64| category(&labels, *v);
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(n + 2)
            .x_label_formatter(&fmt)
            .x_desc("policy")
            .y_desc(c.y_label.as_str())
            .y_label_formatter(&tick)
            .axis_desc_style((FAMILY, AXIS))
            .label_style((FAMILY, TICKS))
            .draw()?;
        let mut base = vec![0.0; n];
        for (j, phase) in c.phases.iter().enumerate() {
            let col = colour(j);
            let rects: Vec<_> = c
                .bars
                .iter()
                .enumerate()
                .map(|(i, b)| {
                    let v = b.values.get(j).copied().filter(|v| v.is_finite());
                    let lo = base[i];
                    base[i] += v.unwrap_or(0.0).max(0.0);
                    let x = i as f64;
                    Rectangle::new([(x - 0.3, lo), (x + 0.3, base[i])], col.filled())
                })
                .collect();
            chart
                .draw_series(rects)?
                .label(phase.as_str())
                .legend(move |(x, y)| Rectangle::new([(x, y - 7), (x + 24, y + 7)], col.filled()));
        }
        chart.draw_series(c.bars.iter().enumerate().map(|(i, b)| {
            let t = total(b);
            Text::new(format!("{t:.0}"), (i as f64, t), centred_above())
        }))?;
        legend(&mut chart, SeriesLabelPosition::UpperRight)
    }
}

struct LoadDraw<'a>(&'a LoadChart);

impl Draw for LoadDraw<'_> {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), PlotError>
    where
        DB::ErrorType: 'static,
    {
        let c = self.0;
        root.fill(&WHITE)?;
        let pts = || c.engines.iter().flat_map(|e| e.points.iter());
        let t_max = pts()
            .map(|p| p.0)
            .filter(|v| v.is_finite())
            .fold(0.0, f64::max);
        let y_max = pts()
            .map(|p| p.1)
            .filter(|v| v.is_finite())
            .fold(0.0, f64::max);
        let mut chart = ChartBuilder::on(root)
            .caption(&c.title, (FAMILY, TITLE))
            .margin(24)
            .margin_right(48)
            .x_label_area_size(70)
            .y_label_area_size(90)
            .build_cartesian_2d(0.0..t_max.max(1e-3), 0.0..headroom(y_max))?;
        chart
            .configure_mesh()
            .x_desc("time since the run began (s)")
            .x_label_formatter(&tick)
            .y_desc(c.y_label.as_str())
            .y_label_formatter(&tick)
            .axis_desc_style((FAMILY, AXIS))
            .label_style((FAMILY, TICKS))
            .light_line_style(BLACK.mix(0.05))
            .draw()?;
        for (i, e) in c.engines.iter().enumerate() {
            let col = colour(i);
            let line: Vec<(f64, f64)> = e
                .points
                .iter()
                .copied()
                .filter(|(t, v)| t.is_finite() && v.is_finite())
                .collect();
            chart
                .draw_series(LineSeries::new(line, col.stroke_width(2)))?
                .label(e.engine.as_str())
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 24, y)], col.stroke_width(3)));
        }
        legend(&mut chart, SeriesLabelPosition::UpperRight)
    }
}
