use super::*;

fn split() -> SplitCurve {
    let p = |prefill, decode, goodput_per_gpu| SplitPoint {
        label: None,
        prefill,
        decode,
        goodput_per_gpu,
    };
    SplitCurve {
        title: "Goodput per GPU, mooncake".into(),
        unit: "req/s within SLO per GPU".into(),
        points: vec![p(4, 12, 0.21), p(8, 8, 0.34), p(12, 4, 0.27)],
        colocated_per_gpu: Some(0.25),
    }
}

fn cdf() -> CdfChart {
    // Two deterministic, different distributions.
    let a: Vec<f64> = (0..1000).map(|i| 100.0 + (i as f64) * 1.5).collect();
    let b: Vec<f64> = (0..1000)
        .map(|i| 300.0 + ((i * 37) % 1000) as f64 * 2.0)
        .collect();
    CdfChart {
        title: "TTFT CDF".into(),
        x_label: "TTFT (ms)".into(),
        series: vec![
            Series {
                name: "prefix".into(),
                values: a,
            },
            Series {
                name: "round-robin".into(),
                values: b,
            },
        ],
        slo: Some(2000.0),
    }
}

fn phases() -> PhaseChart {
    PhaseChart {
        title: "Where TTFT goes".into(),
        phases: ["queue", "prefill", "handoff", "decode first token"]
            .map(String::from)
            .to_vec(),
        bars: vec![
            PhaseBar {
                label: "prefix".into(),
                values: vec![5.0, 120.0, 8.0, 30.0],
            },
            PhaseBar {
                label: "round-robin".into(),
                values: vec![40.0, 300.0, 9.0, 31.0],
            },
        ],
        y_label: "mean ms".into(),
    }
}

fn load() -> LoadChart {
    let e = |name: &str, k: f64| EngineLoad {
        engine: name.into(),
        points: (0..50)
            .map(|i| (i as f64 * 0.5, ((i as f64) * k).sin().abs() * 6.0))
            .collect(),
    };
    LoadChart {
        title: "Engine load".into(),
        y_label: "requests in flight".into(),
        engines: vec![e("prefill 0", 0.3), e("decode 0", 0.17)],
    }
}

/// A valid PNG of the chart's size, decoded back, with more than a background's worth of ink.
fn check_png(bytes: &[u8]) {
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    let dec = png::Decoder::new(std::io::Cursor::new(bytes));
    let mut r = dec.read_info().expect("PNG header");
    let mut buf = vec![0; r.output_buffer_size()];
    let info = r.next_frame(&mut buf).expect("PNG data");
    assert_eq!((info.width, info.height), (WIDTH, HEIGHT));
    // The title's band (top 60 px) is white unless its text was rasterised: the embedded font
    // works without any system font library.
    let row = (WIDTH * 3) as usize;
    let dark = buf[..row * 60]
        .chunks(3)
        .filter(|p| p.iter().all(|&c| c < 128))
        .count();
    assert!(
        dark > 200,
        "title band has {dark} dark pixels: no text drawn"
    );
}

fn check_svg(svg: &str, texts: &[&str]) {
    assert!(svg.starts_with("<svg"), "{}", &svg[..40.min(svg.len())]);
    assert!(svg.trim_end().ends_with("</svg>"));
    // Every `<text …>CONTENT</text>`, trimmed (the backend puts the content on its own line).
    let found: Vec<&str> = svg
        .split("<text")
        .skip(1)
        .filter_map(|t| Some(t.split_once('>')?.1.split_once("</text>")?.0.trim()))
        .collect();
    for t in texts {
        assert!(found.contains(t), "SVG lacks the text {t:?}; has {found:?}");
    }
}

#[test]
fn goodput_vs_split_renders_bars_labels_and_the_colocated_line() {
    let c = goodput_vs_split(&split()).unwrap();
    check_png(&c.png);
    check_svg(
        &c.svg,
        &[
            "Goodput per GPU, mooncake",
            "4P+12D",
            "8P+8D",
            "12P+4D",
            "req/s within SLO per GPU",
            "P/D disaggregated",
            "colocated, same GPUs (0.250)",
            "0.340",
        ],
    );
}

#[test]
fn latency_cdf_renders_one_line_per_policy_and_the_slo() {
    let c = latency_cdf(&cdf()).unwrap();
    check_png(&c.png);
    check_svg(
        &c.svg,
        &[
            "TTFT CDF",
            "TTFT (ms)",
            "prefix",
            "round-robin",
            "SLO 2000",
            "requests at or below (%)",
        ],
    );
}

#[test]
fn an_slo_far_above_every_sample_is_named_not_drawn() {
    let mut c = cdf();
    c.slo = Some(100_000.0);
    let svg = latency_cdf(&c).unwrap().svg;
    check_svg(&svg, &["TTFT (ms) (SLO 100000: off the axis)", "prefix"]);
    assert!(
        !svg.contains(">\nSLO 100000\n<"),
        "the SLO has a legend entry"
    );
}

#[test]
fn phase_bars_stack_every_phase_with_its_total() {
    let c = phase_bars(&phases()).unwrap();
    check_png(&c.png);
    check_svg(
        &c.svg,
        &[
            "Where TTFT goes",
            "queue",
            "prefill",
            "handoff",
            "decode first token",
            "mean ms",
            "163",
            "380",
        ],
    );
}

#[test]
fn engine_load_renders_one_line_per_engine() {
    let c = engine_load(&load()).unwrap();
    check_png(&c.png);
    check_svg(
        &c.svg,
        &[
            "Engine load",
            "prefill 0",
            "decode 0",
            "requests in flight",
            "time since the run began (s)",
        ],
    );
}

#[test]
fn empty_inputs_are_an_error_not_a_blank_chart() {
    let mut s = split();
    s.points.clear();
    assert!(matches!(goodput_vs_split(&s), Err(PlotError::Empty(_))));
    let mut c = cdf();
    c.series.iter_mut().for_each(|s| s.values = vec![f64::NAN]);
    assert!(matches!(latency_cdf(&c), Err(PlotError::Empty(_))));
    let mut p = phases();
    p.bars.clear();
    assert!(matches!(phase_bars(&p), Err(PlotError::Empty(_))));
    let mut l = load();
    l.engines.iter_mut().for_each(|e| e.points.clear());
    assert!(matches!(engine_load(&l), Err(PlotError::Empty(_))));
}

#[test]
fn cdf_points_are_sorted_thinned_and_end_at_100_percent() {
    let v: Vec<f64> = (0..10_000).rev().map(f64::from).collect();
    let p = charts::cdf_points(&v);
    assert!(p.len() <= 401, "{}", p.len());
    assert!(p.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 < w[1].1));
    assert_eq!(p.last(), Some(&(9999.0, 100.0)));
    assert_eq!(p[0], (0.0, 0.01));
    assert_eq!(charts::cdf_points(&[3.0]), vec![(3.0, 100.0)]);
}

#[test]
fn write_puts_both_files_in_the_directory() {
    let dir = tempfile::tempdir().unwrap();
    let [png, svg] = goodput_vs_split(&split())
        .unwrap()
        .write(dir.path(), "split")
        .unwrap();
    assert!(std::fs::read(&png).unwrap().starts_with(b"\x89PNG"));
    assert!(std::fs::read_to_string(&svg).unwrap().contains("8P+8D"));
    // For a person to look at: TANDEM_PLOT_DIR=/some/dir keeps every chart there.
    if let Some(keep) = std::env::var_os("TANDEM_PLOT_DIR") {
        let keep = std::path::Path::new(&keep);
        goodput_vs_split(&split())
            .unwrap()
            .write(keep, "split")
            .unwrap();
        latency_cdf(&cdf()).unwrap().write(keep, "cdf").unwrap();
        phase_bars(&phases())
            .unwrap()
            .write(keep, "phases")
            .unwrap();
        engine_load(&load()).unwrap().write(keep, "load").unwrap();
    }
}
