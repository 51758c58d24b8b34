//! The configurations `tandem plan` tries, and the parallel sweep over them.

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use serde::Serialize;
use tandem_config::{PolicyName, RoutingConfig};
use tandem_fleet::FleetConfig;
use tandem_policy::DisaggMode;
use tandem_workload::{Synthesizer, Trace};

use super::search::{self, Bracket, CurvePoint, Evaluated, PlanResult, Progress};
use super::{Hardware, PlanArgs};
use crate::harness::BoxError;

/// How requests are split between the pools.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// `disaggregation.mode = "always"`.
    Always,
    /// `"conditional"` with this `local_max_uncached_tokens`.
    Conditional(u32),
    /// One pool of engines that run whole requests (`"never"`).
    Colocated,
}

/// One deployment to evaluate.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Candidate {
    pub prefill: u32,
    pub decode: u32,
    pub mode: Mode,
    /// The prefill pool's policy (the only pool's, colocated).
    pub prefill_policy: PolicyName,
    pub decode_policy: PolicyName,
    /// Host-memory KV tier per prefill engine, GiB (0: none).
    pub host_tier_gib: f64,
}

pub fn policy(s: &str) -> Result<PolicyName, BoxError> {
    let v = serde_json::Value::String(s.trim().to_string());
    serde_json::from_value(v).map_err(|_| format!("unknown policy `{s}`").into())
}

impl Candidate {
    /// `--fixed P:D` with `--policy` and `--prefill-kv-offloading-gib`.
    pub fn fixed(a: &PlanArgs, p: usize, d: usize) -> Result<Self, BoxError> {
        let (pp, dp) = match a.policy.split_once(':') {
            Some((p, d)) => (policy(p)?, policy(d)?),
            None => (policy(&a.policy)?, PolicyName::KvCapacity),
        };
        if d == 0 {
            return Err("--fixed needs at least one decode engine".into());
        }
        Ok(Candidate {
            prefill: p as u32,
            decode: d as u32,
            mode: if p == 0 {
                Mode::Colocated
            } else {
                Mode::Always
            },
            prefill_policy: pp,
            decode_policy: if p == 0 { pp } else { dp },
            host_tier_gib: a.prefill_kv_offloading_gib.unwrap_or(0.0),
        })
    }

    pub fn label(&self) -> String {
        let host = if self.host_tier_gib > 0.0 {
            format!(" host {} GiB", self.host_tier_gib)
        } else {
            String::new()
        };
        match self.mode {
            Mode::Colocated => format!(
                "colocated {} {}{host}",
                self.decode,
                self.prefill_policy.as_str()
            ),
            Mode::Always => format!(
                "{}P+{}D always {}{host}",
                self.prefill,
                self.decode,
                self.prefill_policy.as_str()
            ),
            Mode::Conditional(t) => format!(
                "{}P+{}D conditional<{t} {}{host}",
                self.prefill,
                self.decode,
                self.prefill_policy.as_str()
            ),
        }
    }

    pub fn gpus(&self, hw: &Hardware) -> u32 {
        self.prefill * hw.prefill.gpus() + self.decode * hw.decode.gpus()
    }

    /// The fleet this candidate is, with the coordinator settings of `a`.
    pub fn fleet(&self, a: &PlanArgs, hw: &Hardware) -> FleetConfig {
        let routing = RoutingConfig::default();
        let kind = |p| tandem_proxy::policy_kind(p, &routing);
        let host = (self.host_tier_gib > 0.0).then_some(self.host_tier_gib);
        let mut cfg = match self.mode {
            Mode::Colocated => {
                let mut e = hw.decode.clone();
                // Colocated engines prefill too, so they get the prefill pool's host tier.
                e.host_tier_gib = host;
                FleetConfig::colocated(
                    vec![e; self.decode as usize],
                    kind(self.prefill_policy),
                    super::slo(a),
                )
            }
            Mode::Always | Mode::Conditional(_) => {
                let mut p = hw.prefill.clone();
                p.host_tier_gib = host;
                let mut c = FleetConfig::disaggregated(
                    vec![p; self.prefill as usize],
                    vec![hw.decode.clone(); self.decode as usize],
                    super::slo(a),
                );
                c.prefill_policy = kind(self.prefill_policy);
                c.decode_policy = kind(self.decode_policy);
                if let Mode::Conditional(t) = self.mode {
                    c.disagg.mode = DisaggMode::Conditional;
                    c.disagg.local_max_uncached_tokens = u64::from(t);
                }
                c
            }
        };
        // As `tandem bench trace` sets it up: only a `prefix` pool subscribes to KV events (the
        // others' indexes are never read, and translating events is a fifth of a run's work).
        let unused = tandem_fleet::Feed::Approximate { ttl_s: 300.0 };
        if self.prefill_policy != PolicyName::Prefix {
            match self.mode {
                Mode::Colocated => cfg.decode_feed = unused,
                _ => cfg.prefill_feed = unused,
            }
        }
        cfg.coordinator_scale = a.coordinator_scale;
        cfg.leg_overhead_s = a.leg_overhead_ms.max(0.0) / 1000.0;
        cfg.scrape_interval_s = a.scrape_interval_ms as f64 / 1000.0;
        cfg.seed = a.seed;
        cfg.expected_output_tokens = routing.expected_output_tokens;
        cfg.request_cost_tokens = routing.request_cost_tokens;
        cfg
    }
}

/// Prefill engine counts to try on a budget of `engines`: the given ones, or five spread over
/// the budget (1/6 to 5/6 of it; every count when there are fewer).
fn prefill_counts(a: &PlanArgs, engines: u32) -> Vec<u32> {
    let mut v: Vec<u32> = if a.prefill_counts.is_empty() {
        (1..=5)
            .map(|k| {
                ((f64::from(engines) * f64::from(k) / 6.0).round() as u32)
                    .clamp(1, engines.saturating_sub(1))
            })
            .collect()
    } else {
        a.prefill_counts.clone()
    };
    v.retain(|&p| p >= 1 && p < engines);
    v.sort_unstable();
    v.dedup();
    v
}

struct Bar {
    done: AtomicUsize,
    probes: AtomicUsize,
    total: AtomicUsize,
    started: Instant,
    out: Mutex<()>,
}

impl Bar {
    fn draw(&self) {
        let _g = self.out.lock().unwrap_or_else(|e| e.into_inner());
        let done = self.done.load(Ordering::Relaxed);
        let width = 30;
        let total = self.total.load(Ordering::Relaxed);
        let filled = (done * width / total.max(1)).min(width);
        eprint!(
            "\r  [{}{}] {done}/{} configurations, {} runs, {:.0} s",
            "#".repeat(filled),
            " ".repeat(width - filled),
            total,
            self.probes.load(Ordering::Relaxed),
            self.started.elapsed().as_secs_f64()
        );
        let _ = std::io::stderr().flush();
    }
}

impl Progress for Bar {
    fn probe(&self) {
        self.probes.fetch_add(1, Ordering::Relaxed);
        self.draw();
    }
}

/// Search every candidate, on `threads` workers; results in candidate order.
fn evaluate(
    a: &PlanArgs,
    hw: &Hardware,
    trace: &Trace,
    synth: &Synthesizer,
    cands: &[(Candidate, Bracket)],
    threads: usize,
    bar: &Bar,
) -> Result<Vec<Evaluated>, BoxError> {
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Result<Evaluated, String>>>> =
        Mutex::new(vec![None; cands.len()]);
    std::thread::scope(|s| {
        for _ in 0..threads.max(1).min(cands.len().max(1)) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((c, b)) = cands.get(i) else { break };
                let cfg = c.fleet(a, hw);
                let r = search::max_rate(&cfg, trace, synth, a.attainment, *b, bar)
                    .map(|found| {
                        let gpus = c.gpus(hw);
                        Evaluated {
                            config: c.clone(),
                            label: c.label(),
                            gpus,
                            goodput_per_gpu: found.max_rate_req_s / f64::from(gpus.max(1)),
                            found,
                        }
                    })
                    .map_err(|e| format!("{}: {e}", c.label()));
                results.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(r);
                bar.done.fetch_add(1, Ordering::Relaxed);
                bar.draw();
            });
        }
    });
    results
        .into_inner()
        .unwrap_or_else(|e| e.into_inner())
        .into_iter()
        .map(|r| r.expect("every candidate ran").map_err(Into::into))
        .collect()
}

/// The highest goodput per GPU; on a tie the first (the defaults come first in sweep order).
fn best_of<'a>(v: impl Iterator<Item = &'a Evaluated>) -> Option<&'a Evaluated> {
    v.fold(None, |best: Option<&Evaluated>, e| match best {
        Some(b) if b.goodput_per_gpu >= e.goodput_per_gpu => Some(b),
        _ => Some(e),
    })
}

/// The two-stage sweep (module docs of `plan`).
pub fn plan(
    a: &PlanArgs,
    hw: &Hardware,
    trace: &Trace,
    synth: &Synthesizer,
) -> Result<PlanResult, BoxError> {
    let per = hw.gpus_per_engine().max(1);
    let engines = a.gpus / per;
    if engines < 1 {
        return Err(format!("a budget of {} GPUs holds no {per}-GPU engine", a.gpus).into());
    }
    let host0 = a.host_tier_gib.first().copied().unwrap_or(0.0);
    let policies: Vec<PolicyName> = a
        .prefill_policies
        .iter()
        .map(|p| policy(p))
        .collect::<Result<_, _>>()?;
    let colocated: Vec<PolicyName> = a
        .colocated_policies
        .iter()
        .map(|p| policy(p))
        .collect::<Result<_, _>>()?;
    let first = Bracket {
        start: a.rate_start,
        factor: 2.0,
        steps: a.bisect_steps,
    };
    let mut stage1: Vec<(Candidate, Bracket)> = prefill_counts(a, engines)
        .into_iter()
        .map(|p| Candidate {
            prefill: p,
            decode: engines - p,
            mode: Mode::Always,
            prefill_policy: policies.first().copied().unwrap_or(PolicyName::Prefix),
            decode_policy: PolicyName::KvCapacity,
            host_tier_gib: host0,
        })
        .map(|c| (c, first))
        .collect();
    let splits = stage1.len();
    if let Some(&p) = colocated.first() {
        stage1.push((
            Candidate {
                prefill: 0,
                decode: engines,
                mode: Mode::Colocated,
                prefill_policy: p,
                decode_policy: p,
                host_tier_gib: host0,
            },
            first,
        ));
    }
    let threads = a.threads.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    });
    let started = Instant::now();
    let modes: Vec<Mode> = a
        .modes
        .iter()
        .flat_map(|m| match m.trim() {
            "always" => vec![Mode::Always],
            "conditional" => a.thresholds.iter().map(|&t| Mode::Conditional(t)).collect(),
            _ => Vec::new(),
        })
        .collect();
    let bar = Bar {
        done: AtomicUsize::new(0),
        probes: AtomicUsize::new(0),
        total: AtomicUsize::new(stage1.len()),
        started,
        out: Mutex::new(()),
    };
    eprintln!(
        "stage 1: {} configurations ({splits} P:D splits of {engines} engines, colocated) on {threads} threads",
        stage1.len(),
    );
    let mut all = evaluate(a, hw, trace, synth, &stage1, threads, &bar)?;
    // Stage two: around the best splits and the colocated baseline, one dimension at a time,
    // each search starting from the configuration it varies.
    let mut ranked: Vec<&Evaluated> = all
        .iter()
        .filter(|e| e.config.mode != Mode::Colocated)
        .collect();
    ranked.sort_by(|x, y| y.goodput_per_gpu.total_cmp(&x.goodput_per_gpu));
    let near = |e: &Evaluated| Bracket {
        start: e.found.rate_scale.unwrap_or(a.rate_start),
        factor: std::f64::consts::SQRT_2,
        steps: a.bisect_steps,
    };
    let mut stage2: Vec<(Candidate, Bracket)> = Vec::new();
    for e in ranked.iter().take(a.refine) {
        let base = e.config.clone();
        for &m in &modes {
            stage2.push((
                Candidate {
                    mode: m,
                    ..base.clone()
                },
                near(e),
            ));
        }
        for &p in &policies {
            stage2.push((
                Candidate {
                    prefill_policy: p,
                    ..base.clone()
                },
                near(e),
            ));
        }
        for &h in &a.host_tier_gib {
            stage2.push((
                Candidate {
                    host_tier_gib: h,
                    ..base.clone()
                },
                near(e),
            ));
        }
    }
    if let Some(e) = all.iter().find(|e| e.config.mode == Mode::Colocated) {
        let base = e.config.clone();
        for &p in &colocated {
            stage2.push((
                Candidate {
                    prefill_policy: p,
                    decode_policy: p,
                    ..base.clone()
                },
                near(e),
            ));
        }
        for &h in &a.host_tier_gib {
            stage2.push((
                Candidate {
                    host_tier_gib: h,
                    ..base.clone()
                },
                near(e),
            ));
        }
    }
    stage2.retain(|(c, _)| !all.iter().any(|e| &e.config == c));
    let mut seen: Vec<Candidate> = Vec::new();
    stage2.retain(|(c, _)| {
        let fresh = !seen.contains(c);
        seen.push(c.clone());
        fresh
    });
    bar.total
        .store(stage1.len() + stage2.len(), Ordering::Relaxed);
    eprintln!();
    eprintln!(
        "stage 2: {} configurations around the best split and the colocated baseline",
        stage2.len()
    );
    all.extend(evaluate(a, hw, trace, synth, &stage2, threads, &bar)?);
    eprintln!();
    let wall = started.elapsed().as_secs_f64();
    Ok(assemble(
        a,
        trace,
        all,
        bar.probes.load(Ordering::Relaxed),
        wall,
    ))
}

fn point(e: &Evaluated) -> CurvePoint {
    CurvePoint {
        prefill: e.config.prefill,
        decode: e.config.decode,
        config: e.label.clone(),
        gpus: e.gpus,
        max_rate_req_s: e.found.max_rate_req_s,
        goodput_per_gpu: e.goodput_per_gpu,
    }
}

fn assemble(
    a: &PlanArgs,
    trace: &Trace,
    all: Vec<Evaluated>,
    runs: usize,
    wall: f64,
) -> PlanResult {
    let mut splits: Vec<(u32, u32)> = all
        .iter()
        .filter(|e| e.config.mode != Mode::Colocated)
        .map(|e| (e.config.prefill, e.config.decode))
        .collect();
    splits.sort_unstable();
    splits.dedup();
    let curve = splits
        .iter()
        .filter_map(|&(p, d)| {
            best_of(
                all.iter()
                    .filter(|e| e.config.mode != Mode::Colocated)
                    .filter(|e| (e.config.prefill, e.config.decode) == (p, d)),
            )
            .map(point)
        })
        .collect();
    let index = |x: Option<&Evaluated>| x.and_then(|x| all.iter().position(|e| std::ptr::eq(e, x)));
    let best = index(best_of(
        all.iter().filter(|e| e.config.mode != Mode::Colocated),
    ));
    let best_colocated = index(best_of(
        all.iter().filter(|e| e.config.mode == Mode::Colocated),
    ));
    PlanResult {
        trace: trace.name.clone(),
        requests: trace.requests.len(),
        trace_rate_req_s: trace.stats().requests_per_s.unwrap_or(0.0),
        gpu_budget: a.gpus,
        slo_ttft_ms: a.slo_ttft_ms,
        slo_tpot_ms: a.slo_tpot_ms,
        attainment_target: a.attainment,
        colocated: best_colocated.map(|i| point(&all[i])),
        curve,
        best,
        best_colocated,
        configs: all,
        runs,
        wall_s: wall,
    }
}
