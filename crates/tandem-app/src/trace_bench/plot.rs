//! `tandem bench trace --plot DIR`: the run's charts from the per-request outcomes.
//!
//! Everything here is computed from what the run already kept: the client's TTFT and TPOT per
//! request, the coordinator's per-phase split of each TTFT, and which engines served each
//! request. Per-engine load over time is rebuilt from those records (a request occupies its
//! prefill engine from the end of its queue wait to the end of its prefill, and its decode
//! engine from then to its last token), so no sampling runs beside the replay.

use std::path::{Path, PathBuf};

use tandem_plot::{CdfChart, EngineLoad, LoadChart, PhaseBar, PhaseChart, PlotError, Series};
use tandem_workload::{Outcome, Slo};

use crate::harness::BoxError;

/// One policy's run, as the plots need it.
#[derive(Debug)]
pub(super) struct PolicyRun<'a> {
    pub name: &'a str,
    pub outcomes: &'a [Outcome],
    /// Each request's send time, simulated ms from the run's start (same index as `outcomes`).
    pub arrivals_ms: &'a [f64],
    pub prefill_urls: &'a [String],
    pub decode_urls: &'a [String],
}

const PHASES: [&str; 4] = ["queue", "prefill", "handoff", "decode first token"];
/// Time bins of the load charts: fine enough to show bursts, few enough for small SVGs.
const LOAD_BINS: usize = 200;

/// Write every chart into `dir` (created if missing); returns the files written.
pub(super) fn write_all(
    dir: &Path,
    trace: &str,
    runs: &[PolicyRun<'_>],
    slo: Slo,
) -> Result<Vec<PathBuf>, BoxError> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut files = Vec::new();
    let mut put = |chart: Result<tandem_plot::Chart, PlotError>, name: &str| {
        match chart {
            Ok(c) => files.extend(c.write(dir, name)?),
            // A run with nothing of a kind (no request finished, no phase records) has no chart
            // of it; the others are still worth having.
            Err(PlotError::Empty(why)) => eprintln!("plot {name}: skipped ({why})"),
            Err(e) => return Err(BoxError::from(e)),
        }
        Ok(())
    };
    put(
        tandem_plot::latency_cdf(&ttft_cdf(trace, runs, slo)),
        "ttft_cdf",
    )?;
    put(
        tandem_plot::latency_cdf(&tpot_cdf(trace, runs, slo)),
        "tpot_cdf",
    )?;
    put(tandem_plot::phase_bars(&phases(trace, runs)), "ttft_phases")?;
    for r in runs {
        let [p, d] = engine_load(trace, r);
        let stem = file_stem(r.name);
        put(
            tandem_plot::engine_load(&p),
            &format!("load_{stem}_prefill"),
        )?;
        put(tandem_plot::engine_load(&d), &format!("load_{stem}_decode"))?;
    }
    Ok(files)
}

/// A policy spec as a file-name part: `prefix:kv-capacity` → `prefix_kv-capacity`.
fn file_stem(spec: &str) -> String {
    spec.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn ttft_cdf(trace: &str, runs: &[PolicyRun<'_>], slo: Slo) -> CdfChart {
    CdfChart {
        title: format!("TTFT, {trace}"),
        x_label: "time to first token (ms)".into(),
        series: runs
            .iter()
            .map(|r| Series {
                name: r.name.to_string(),
                values: r
                    .outcomes
                    .iter()
                    .filter(|o| o.ok)
                    .map(|o| o.ttft_ms)
                    .collect(),
            })
            .collect(),
        slo: Some(slo.ttft_ms),
    }
}

fn tpot_cdf(trace: &str, runs: &[PolicyRun<'_>], slo: Slo) -> CdfChart {
    CdfChart {
        title: format!("TPOT, {trace}"),
        x_label: "time per output token (ms)".into(),
        series: runs
            .iter()
            .map(|r| Series {
                name: r.name.to_string(),
                values: r
                    .outcomes
                    .iter()
                    .filter(|o| o.ok)
                    .filter_map(Outcome::tpot_ms)
                    .collect(),
            })
            .collect(),
        slo: Some(slo.tpot_ms),
    }
}

/// Mean of each phase over the requests that have the coordinator's split. Policies with no
/// such request get no bar.
fn phases(trace: &str, runs: &[PolicyRun<'_>]) -> PhaseChart {
    let bars = runs
        .iter()
        .filter_map(|r| {
            let split: Vec<[f64; 4]> = r
                .outcomes
                .iter()
                .filter(|o| o.ok)
                .filter_map(|o| o.phases_ms)
                .collect();
            let n = split.len() as f64;
            (n > 0.0).then(|| PhaseBar {
                label: r.name.to_string(),
                values: (0..4)
                    .map(|j| split.iter().map(|p| p[j]).sum::<f64>() / n)
                    .collect(),
            })
        })
        .collect();
    PhaseChart {
        title: format!("Where TTFT goes, {trace} (coordinator's split)"),
        phases: PHASES.map(String::from).to_vec(),
        bars,
        y_label: "mean ms".into(),
    }
}

/// Busy spans `(engine index, start s, end s)` on each pool, from one run's records. Without
/// the coordinator's split (a request it did not record), the first token marks the handover.
fn spans(r: &PolicyRun<'_>) -> [Vec<(usize, f64, f64)>; 2] {
    let mut out = [Vec::new(), Vec::new()];
    for (o, &at) in r.outcomes.iter().zip(r.arrivals_ms) {
        if !o.ok {
            continue;
        }
        let (start, handover) = match o.phases_ms {
            Some([q, p, ..]) => (at + q, at + q + p),
            None => (at, at + o.ttft_ms),
        };
        let end = (at + o.e2e_ms).max(handover);
        let legs = [
            (&o.prefill_engine, r.prefill_urls, start, handover),
            (&o.decode_engine, r.decode_urls, handover, end),
        ];
        for (pool, (engine, urls, a, b)) in legs.into_iter().enumerate() {
            if let Some(i) = engine
                .as_ref()
                .and_then(|e| urls.iter().position(|u| u == e))
            {
                out[pool].push((i, a / 1000.0, b / 1000.0));
            }
        }
    }
    out
}

/// Mean requests in flight on each engine per time bin (exact: each span adds its overlap).
fn binned(spans: &[(usize, f64, f64)], engines: usize, t_end: f64) -> Vec<Vec<(f64, f64)>> {
    let w = (t_end / LOAD_BINS as f64).max(1e-9);
    let mut load = vec![vec![0.0; LOAD_BINS]; engines];
    for &(e, a, b) in spans {
        let (first, last) = ((a / w) as usize, ((b / w) as usize).min(LOAD_BINS - 1));
        for (k, slot) in load[e].iter_mut().enumerate().take(last + 1).skip(first) {
            let (lo, hi) = (k as f64 * w, (k + 1) as f64 * w);
            *slot += (b.min(hi) - a.max(lo)).max(0.0) / w;
        }
    }
    load.into_iter()
        .map(|bins| {
            bins.into_iter()
                .enumerate()
                .map(|(k, v)| ((k as f64 + 0.5) * w, v))
                .collect()
        })
        .collect()
}

/// Per-engine load over the run, prefill pool and decode pool.
fn engine_load(trace: &str, r: &PolicyRun<'_>) -> [LoadChart; 2] {
    let [p, d] = spans(r);
    let t_end = p.iter().chain(&d).map(|s| s.2).fold(0.0, f64::max);
    let chart = |pool: &str, tag: char, spans: &[(usize, f64, f64)], n: usize| LoadChart {
        title: format!("{pool} engines' load, {trace}, {}", r.name),
        y_label: "requests in flight (bin mean)".into(),
        engines: if spans.is_empty() {
            Vec::new()
        } else {
            binned(spans, n, t_end)
                .into_iter()
                .enumerate()
                .map(|(i, points)| EngineLoad {
                    engine: format!("{tag}{i}"),
                    points,
                })
                .collect()
        },
    };
    [
        chart("Prefill", 'P', &p, r.prefill_urls.len()),
        chart("Decode", 'D', &d, r.decode_urls.len()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(ttft: f64, e2e: f64, out: u32, p: &str, d: &str, ph: Option<[f64; 4]>) -> Outcome {
        Outcome {
            ok: true,
            ttft_ms: ttft,
            itl_ms: Vec::new(),
            e2e_ms: e2e,
            output_tokens: out,
            prompt_tokens: 100,
            cached_tokens: 0,
            prefill_engine: Some(p.into()),
            decode_engine: Some(d.into()),
            phases_ms: ph,
        }
    }

    #[test]
    fn spans_follow_the_phases_and_bins_are_time_weighted_means() {
        let urls_p = vec!["p0".to_string(), "p1".to_string()];
        let urls_d = vec!["d0".to_string()];
        let o = vec![
            // Sent at 0: queue 0–1 s, prefill 1–3 s on p0, decode 3–4 s on d0.
            outcome(
                3000.0,
                4000.0,
                10,
                "p0",
                "d0",
                Some([1000.0, 2000.0, 0.0, 0.0]),
            ),
            // Sent at 2 s, no split: prefill until its first token (3 s), decode to 4 s.
            outcome(1000.0, 2000.0, 10, "p1", "d0", None),
        ];
        let r = PolicyRun {
            name: "prefix",
            outcomes: &o,
            arrivals_ms: &[0.0, 2000.0],
            prefill_urls: &urls_p,
            decode_urls: &urls_d,
        };
        let [p, d] = spans(&r);
        assert_eq!(p, vec![(0, 1.0, 3.0), (1, 2.0, 3.0)]);
        assert_eq!(d, vec![(0, 3.0, 4.0), (0, 3.0, 4.0)]);
        // 200 bins over 4 s: p0 is busy in bins 50..150, d0 holds two requests in 150..200.
        let b = binned(&p, 2, 4.0);
        assert!((b[0][49].1).abs() < 1e-9 && (b[0][50].1 - 1.0).abs() < 1e-9);
        let total: f64 = b[0].iter().map(|x| x.1 * 0.02).sum();
        assert!((total - 2.0).abs() < 1e-6, "{total}");
        let bd = binned(&d, 1, 4.0);
        assert!((bd[0][175].1 - 2.0).abs() < 1e-9);
        let [lp, ld] = engine_load("t", &r);
        assert_eq!(lp.engines.len(), 2);
        assert_eq!(ld.engines[0].engine, "D0");
    }

    #[test]
    fn phase_bars_are_means_and_policies_without_records_get_none() {
        let a = vec![
            outcome(10.0, 20.0, 2, "p", "d", Some([1.0, 2.0, 3.0, 4.0])),
            outcome(10.0, 20.0, 2, "p", "d", Some([3.0, 4.0, 5.0, 6.0])),
        ];
        let b = vec![outcome(10.0, 20.0, 2, "p", "d", None)];
        let none: Vec<String> = Vec::new();
        let run = |name, outcomes| PolicyRun {
            name,
            outcomes,
            arrivals_ms: &[0.0, 0.0],
            prefill_urls: &none,
            decode_urls: &none,
        };
        let c = phases("t", &[run("x", &a), run("y", &b)]);
        assert_eq!(c.bars.len(), 1);
        assert_eq!(c.bars[0].values, vec![2.0, 3.0, 4.0, 5.0]);
        assert_eq!(file_stem("prefix:kv-capacity"), "prefix_kv-capacity");
    }

    #[test]
    fn write_all_produces_every_chart_as_png_and_svg() {
        let o = vec![outcome(
            300.0,
            900.0,
            20,
            "p0",
            "d0",
            Some([10.0, 250.0, 20.0, 20.0]),
        )];
        let urls = (vec!["p0".to_string()], vec!["d0".to_string()]);
        let r = PolicyRun {
            name: "prefix",
            outcomes: &o,
            arrivals_ms: &[0.0],
            prefill_urls: &urls.0,
            decode_urls: &urls.1,
        };
        let dir = tempfile::tempdir().unwrap();
        let slo = Slo {
            ttft_ms: 2000.0,
            tpot_ms: 100.0,
        };
        let files = write_all(dir.path(), "chat", &[r], slo).unwrap();
        let names: Vec<String> = files
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        for n in [
            "ttft_cdf",
            "tpot_cdf",
            "ttft_phases",
            "load_prefix_prefill",
            "load_prefix_decode",
        ] {
            assert!(names.contains(&format!("{n}.png")), "{names:?}");
            assert!(names.contains(&format!("{n}.svg")), "{names:?}");
        }
    }
}
