//! Rate search: the highest arrival rate at which a configuration still meets the SLO
//! attainment target, as a scale of the trace's own rate.
//!
//! Attainment falls as the rate rises (more queueing, bigger batches), so the search brackets
//! the boundary by stepping a factor up or down from a start (the trace's rate in the sweep's
//! first stage, the refined configuration's own answer in the second), then bisects the
//! bracket geometrically. A run that is certain to fail stops as soon as more requests have missed the
//! SLO than the target allows ([`tandem_fleet::FleetConfig::stop_after_misses`]): overloaded
//! fleets are the slowest to simulate and the search only needs their verdict.

use serde::Serialize;
use tandem_fleet::{FleetConfig, FleetError};
use tandem_workload::{Summary, Synthesizer, Trace};

/// Rate scales the bracket may reach, either way from 1 (a short built-in workload on 16 GPUs
/// still attains at 64× its rate).
const MAX_SCALE: f64 = 1024.0;

/// One simulated run of the search.
#[derive(Debug, Clone, Serialize)]
pub struct Probe {
    pub rate_scale: f64,
    /// Arrivals per second at that scale.
    pub rate_req_s: f64,
    pub attainment: f64,
    pub stopped_early: bool,
}

/// The search's answer for one configuration.
#[derive(Debug, Clone, Serialize)]
pub struct Found {
    /// Highest scale that attained the target (`None`: not even 1/1024 of the trace's rate).
    pub rate_scale: Option<f64>,
    /// Arrivals per second at that scale.
    pub max_rate_req_s: f64,
    /// The full run at that scale (the figures the planner reports).
    pub summary: Option<Summary>,
    /// Every run, in the order made.
    pub probes: Vec<Probe>,
    /// The highest scale searched still attained: the true maximum is higher.
    pub capped: bool,
}

/// Runs of one search, for the progress bar.
pub trait Progress: Sync {
    fn probe(&self);
}

fn attempt(
    cfg: &FleetConfig,
    trace: &Trace,
    synth: &Synthesizer,
    scale: f64,
    target: f64,
) -> Result<(Probe, Summary), FleetError> {
    let scaled = trace
        .scaled(scale)
        .expect("scales the search makes are positive and finite");
    let mut cfg = cfg.clone();
    let n = scaled.requests.len();
    cfg.stop_after_misses = Some(((1.0 - target) * n as f64).floor() as usize);
    let r = tandem_fleet::run(&cfg, &scaled, synth)?;
    let rate = scaled.stats().requests_per_s.unwrap_or(0.0);
    Ok((
        Probe {
            rate_scale: scale,
            rate_req_s: rate,
            attainment: r.summary.slo_attainment,
            stopped_early: r.stats.stopped_early,
        },
        r.summary,
    ))
}

/// Where a search starts and how far it steps.
#[derive(Debug, Clone, Copy)]
pub struct Bracket {
    /// First rate scale tried.
    pub start: f64,
    /// Factor of each bracketing step up or down (> 1).
    pub factor: f64,
    /// Geometric bisections of the bracket once found (each halves its log-width).
    pub steps: u32,
}

/// Bracket from `b.start` by `b.factor`, then bisect `b.steps` times.
pub fn max_rate(
    cfg: &FleetConfig,
    trace: &Trace,
    synth: &Synthesizer,
    target: f64,
    b: Bracket,
    progress: &dyn Progress,
) -> Result<Found, FleetError> {
    let mut probes = Vec::new();
    let mut best: Option<(f64, f64, Summary)> = None;
    let mut run = |scale: f64, probes: &mut Vec<Probe>| -> Result<bool, FleetError> {
        let (p, s) = attempt(cfg, trace, synth, scale, target)?;
        progress.probe();
        let ok = !p.stopped_early && p.attainment >= target;
        if ok && best.as_ref().is_none_or(|(b, _, _)| scale > *b) {
            best = Some((scale, p.rate_req_s, s));
        }
        probes.push(p);
        Ok(ok)
    };
    let f = b.factor.max(1.01);
    let start = b.start.clamp(1.0 / MAX_SCALE, MAX_SCALE);
    let (mut lo, mut hi) = if run(start, &mut probes)? {
        let mut lo = start;
        loop {
            let next = lo * f;
            if next > MAX_SCALE {
                break (lo, lo);
            }
            if run(next, &mut probes)? {
                lo = next;
            } else {
                break (lo, next);
            }
        }
    } else {
        let mut hi = start;
        loop {
            let next = hi / f;
            if next < 1.0 / MAX_SCALE {
                break (0.0, hi);
            }
            if run(next, &mut probes)? {
                break (next, hi);
            }
            hi = next;
        }
    };
    let capped = lo > 0.0 && lo == hi;
    if lo > 0.0 && hi > lo {
        for _ in 0..b.steps {
            let mid = (lo * hi).sqrt();
            if run(mid, &mut probes)? {
                lo = mid;
            } else {
                hi = mid;
            }
        }
    }
    Ok(match best {
        Some((scale, rate, summary)) => Found {
            rate_scale: Some(scale),
            max_rate_req_s: rate,
            summary: Some(summary),
            probes,
            capped,
        },
        None => Found {
            rate_scale: None,
            max_rate_req_s: 0.0,
            summary: None,
            probes,
            capped: false,
        },
    })
}

/// One point of the goodput-per-GPU curve (plain data, for plots and JSON).
#[derive(Debug, Clone, Serialize)]
pub struct CurvePoint {
    pub prefill: u32,
    pub decode: u32,
    /// The best configuration found at this split.
    pub config: String,
    pub gpus: u32,
    /// Highest arrival rate meeting the attainment target, req/s.
    pub max_rate_req_s: f64,
    /// That rate per GPU (DistServe's per-GPU goodput).
    pub goodput_per_gpu: f64,
}

/// What the planner found.
#[derive(Debug, Clone, Serialize)]
pub struct PlanResult {
    pub trace: String,
    pub requests: usize,
    /// The trace's own arrival rate, req/s (rate scale 1).
    pub trace_rate_req_s: f64,
    pub gpu_budget: u32,
    pub slo_ttft_ms: f64,
    pub slo_tpot_ms: f64,
    pub attainment_target: f64,
    /// Every configuration tried, in sweep order.
    pub configs: Vec<Evaluated>,
    /// Best P/D configuration per split, ascending prefill count.
    pub curve: Vec<CurvePoint>,
    /// Best colocated configuration on the whole budget.
    pub colocated: Option<CurvePoint>,
    /// Index into `configs` of the best P/D configuration.
    pub best: Option<usize>,
    /// Index into `configs` of the best colocated one.
    pub best_colocated: Option<usize>,
    /// Fleet runs made, and the sweep's wall time.
    pub runs: usize,
    pub wall_s: f64,
}

/// One configuration and its search.
#[derive(Debug, Clone, Serialize)]
pub struct Evaluated {
    pub config: super::sweep::Candidate,
    pub label: String,
    pub gpus: u32,
    pub found: Found,
    pub goodput_per_gpu: f64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_fleet::EngineSpec;
    use tandem_sim::profile::{GpuKind, Profile};
    use tandem_workload::{PromptSpec, Request, Segment, Slo, Source};

    struct Quiet;
    impl Progress for Quiet {
        fn probe(&self) {}
    }

    #[test]
    fn the_search_brackets_the_highest_attaining_rate() {
        // 80 requests of 6k-token prompts, 1P+1D 8B on H100, TTFT ≤ 1 s: the prefill engine
        // saturates somewhere between a few and a few tens of requests per second.
        let reqs: Vec<Request> = (0..80u64)
            .map(|i| Request {
                at_ms: i as f64 * 250.0,
                input: PromptSpec {
                    segments: vec![Segment {
                        source: Source::Unique(i),
                        len: 6000,
                    }],
                },
                output_tokens: 16,
            })
            .collect();
        let trace = Trace::new("t", reqs, None);
        let spec = EngineSpec::new(Profile::new("llama-3.1-8b", GpuKind::H100, None).unwrap());
        let slo = Slo {
            ttft_ms: 1000.0,
            tpot_ms: 100.0,
        };
        let cfg = FleetConfig::disaggregated(vec![spec.clone()], vec![spec], slo);
        let synth = Synthesizer::new(0, 0..256).unwrap();
        let b = Bracket {
            start: 1.0,
            factor: 2.0,
            steps: 3,
        };
        let f = max_rate(&cfg, &trace, &synth, 0.9, b, &Quiet).unwrap();
        let best = f.rate_scale.expect("some rate attains");
        let ok = |p: &Probe| !p.stopped_early && p.attainment >= 0.9;
        // The answer is the highest passing probe, and the lowest failing one is within the
        // bracket's final width (2^(1/8)) above it.
        let top_pass = f.probes.iter().filter(|p| ok(p)).map(|p| p.rate_scale);
        assert_eq!(top_pass.fold(0.0, f64::max), best);
        let low_fail = f
            .probes
            .iter()
            .filter(|p| !ok(p))
            .map(|p| p.rate_scale)
            .fold(f64::INFINITY, f64::min);
        assert!(low_fail > best, "{:?}", f.probes);
        assert!(
            low_fail / best <= 2f64.powf(1.0 / 8.0) + 1e-9,
            "{:?}",
            f.probes
        );
        // The figures reported are the answer's own run.
        assert!(f.summary.unwrap().slo_attainment >= 0.9);
        assert!(f.max_rate_req_s > 1.0);
    }
}
