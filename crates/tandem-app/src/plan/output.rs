//! What `tandem plan` prints: every configuration, the curve, the verdict against colocated
//! serving, the best configuration as a `tandem.toml` fragment and kustomize pool sizes, and the
//! JSON and plots.

use std::fmt::Write as _;

use tandem_config::PolicyName;

use super::search::{Evaluated, PlanResult};
use super::sweep::{Candidate, Mode};
use super::{Hardware, PlanArgs};
use crate::harness::BoxError;

fn ms(d: Option<tandem_workload::Dist>, f: fn(&tandem_workload::Dist) -> f64) -> String {
    d.map_or("-".into(), |d| format!("{:.0}", f(&d)))
}

/// One row per configuration.
pub fn table(r: &PlanResult) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<44} {:>4} {:>9} {:>9} {:>9} {:>7} {:>15} {:>9} {:>6}",
        "configuration",
        "GPUs",
        "max req/s",
        "req/s/GPU",
        "goodput",
        "attain",
        "TTFT p50/p90 ms",
        "TPOT p50",
        "hit %"
    );
    for e in &r.configs {
        let sm = e.found.summary.as_ref();
        let _ = writeln!(
            s,
            "{:<44} {:>4} {:>9} {:>9.3} {:>9.2} {:>6.1}% {:>7}/{:<7} {:>9} {:>6}",
            e.label,
            e.gpus,
            format!(
                "{}{:.2}",
                if e.found.capped { "≥" } else { "" },
                e.found.max_rate_req_s
            ),
            e.goodput_per_gpu,
            sm.map_or(0.0, |s| s.goodput_requests_per_s),
            sm.map_or(0.0, |s| s.slo_attainment * 100.0),
            ms(sm.and_then(|s| s.ttft_ms), |d| d.p50),
            ms(sm.and_then(|s| s.ttft_ms), |d| d.p90),
            sm.and_then(|s| s.tpot_ms)
                .map_or("-".into(), |d| format!("{:.1}", d.p50)),
            sm.and_then(|s| s.prefix_hit_rate)
                .map_or("-".into(), |h| format!("{:.1}", h * 100.0)),
        );
    }
    s
}

/// The verdict: by how much P/D beats colocated on the same GPUs, or that it does not.
pub fn verdict(r: &PlanResult) -> String {
    let pd = r.best.map(|i| &r.configs[i]);
    let co = r.best_colocated.map(|i| &r.configs[i]);
    match (pd, co) {
        (Some(p), Some(c)) if c.goodput_per_gpu > 0.0 => {
            let x = p.goodput_per_gpu / c.goodput_per_gpu;
            if x > 1.05 {
                format!(
                    "disaggregate: {} serves {:.3} req/s per GPU within the SLO, {:.2}× the best colocated deployment ({}, {:.3})",
                    p.label, p.goodput_per_gpu, x, c.label, c.goodput_per_gpu
                )
            } else {
                format!(
                    "don't disaggregate: the best P/D configuration ({}, {:.3} req/s per GPU) is {:.2}× the best colocated deployment ({}, {:.3}); run every engine whole",
                    p.label, p.goodput_per_gpu, x, c.label, c.goodput_per_gpu
                )
            }
        }
        (Some(p), _) if p.goodput_per_gpu > 0.0 => format!(
            "disaggregate: {} ({:.3} req/s per GPU); no colocated deployment met the SLO at any rate",
            p.label, p.goodput_per_gpu
        ),
        (_, Some(c)) if c.goodput_per_gpu > 0.0 => format!(
            "don't disaggregate: no P/D split met the SLO; colocated {} serves {:.3} req/s per GPU",
            c.label, c.goodput_per_gpu
        ),
        _ => "no configuration met the SLO at any rate the search tried (down to 1/1024 of the trace's)".into(),
    }
}

/// The winner: the better of the best P/D and the best colocated configuration.
/// The `tandem bench trace` command that replays `c` at the rate the search found for it, in
/// real time; `None` for what it cannot replay (`conditional` mode) or a configuration the
/// search found no rate for.
pub fn replay_command(a: &PlanArgs, c: &Evaluated) -> Option<String> {
    let scale = c.found.rate_scale?;
    let k = &c.config;
    let (prefill, compare) = match k.mode {
        Mode::Conditional(_) => return None,
        Mode::Colocated => (0, k.prefill_policy.as_str().to_string()),
        Mode::Always if k.decode_policy == PolicyName::KvCapacity => {
            (k.prefill, k.prefill_policy.as_str().to_string())
        }
        Mode::Always => (
            k.prefill,
            format!("{}:{}", k.prefill_policy.as_str(), k.decode_policy.as_str()),
        ),
    };
    let mut cmd = String::from("tandem bench trace");
    if let Some(f) = &a.file {
        let _ = write!(cmd, " --file {}", f.display());
    }
    let _ = write!(
        cmd,
        " --format {} --rate-scale {scale:.4} --time-scale 1 --prefill {prefill} --decode {} --compare {compare} --feed precise --model {} --gpu {}",
        format!("{:?}", a.format).to_lowercase(),
        k.decode,
        a.model,
        a.gpu
    );
    if k.host_tier_gib > 0.0 {
        let _ = write!(cmd, " --prefill-kv-offloading-gib {}", k.host_tier_gib);
    }
    Some(cmd)
}

pub fn winner(r: &PlanResult) -> Option<&Evaluated> {
    let pd = r.best.map(|i| &r.configs[i]);
    let co = r.best_colocated.map(|i| &r.configs[i]);
    match (pd, co) {
        (Some(p), Some(c)) => Some(if p.goodput_per_gpu > c.goodput_per_gpu * 1.05 {
            p
        } else {
            c
        }),
        (p, c) => p.or(c),
    }
    .filter(|e| e.goodput_per_gpu > 0.0)
}

/// A `tandem.toml` fragment for the candidate: the keys the planner chose, with placeholder
/// endpoints (one per engine) that a deployment replaces or turns into a `dns` table.
pub fn toml_fragment(c: &Candidate) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# tandem plan: {}", c.label());
    let (mode, threshold) = match c.mode {
        Mode::Always => ("always", None),
        Mode::Conditional(t) => ("conditional", Some(t)),
        Mode::Colocated => ("never", None),
    };
    let _ = writeln!(s, "[disaggregation]\nmode = \"{mode}\"");
    if let Some(t) = threshold {
        let _ = writeln!(s, "local_max_uncached_tokens = {t}");
    }
    if c.prefill > 0 {
        let _ = writeln!(
            s,
            "\n[pools]\ntarget_ratio = \"{}:{}\"",
            c.prefill, c.decode
        );
    }
    let endpoints = |pool: &str, n: u32| {
        (0..n)
            .map(|i| format!("\"http://vllm-{pool}-{i}:8000\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let pool = |s: &mut String, name: &str, n: u32, policy: PolicyName, precise: bool| {
        let _ = writeln!(
            s,
            "\n[pools.{name}]\npolicy = \"{}\"\nendpoints = [{}]",
            policy.as_str(),
            endpoints(name, n)
        );
        if precise {
            let _ = writeln!(
                s,
                "\n[pools.{name}.prefix_index]\nfeed = \"precise\"\n\n[pools.{name}.kv_events]\nport = 5557\nreplay_port = 5558"
            );
        }
    };
    if c.mode == Mode::Colocated {
        let _ = writeln!(s, "\n[pools.prefill]\nendpoints = []");
        pool(
            &mut s,
            "decode",
            c.decode,
            c.prefill_policy,
            c.prefill_policy == PolicyName::Prefix,
        );
    } else {
        pool(
            &mut s,
            "prefill",
            c.prefill,
            c.prefill_policy,
            c.prefill_policy == PolicyName::Prefix,
        );
        pool(&mut s, "decode", c.decode, c.decode_policy, false);
    }
    if c.host_tier_gib > 0.0 {
        let who = if c.mode == Mode::Colocated {
            "every"
        } else {
            "every prefill"
        };
        let _ = writeln!(
            s,
            "# {who} engine: vllm serve ... --kv-offloading-size {} (host-memory KV tier, GiB)",
            c.host_tier_gib
        );
    }
    s
}

/// `deploy/k8s/pools/kustomization.yaml` with the candidate's pool sizes.
pub fn kustomize(c: &Candidate) -> String {
    format!(
        "apiVersion: kustomize.config.k8s.io/v1alpha1\nkind: Component\nreplicas:\n  - name: vllm-prefill\n    count: {}\n  - name: vllm-decode\n    count: {}\n",
        c.prefill, c.decode
    )
}

pub fn print(a: &PlanArgs, hw: &Hardware, r: &PlanResult) -> Result<(), BoxError> {
    println!("{}", table(r));
    println!("goodput per GPU against the P:D split (best configuration at each split):");
    for p in &r.curve {
        println!(
            "  {:>9}  {:>7.3} req/s/GPU  ({})",
            format!("{}P+{}D", p.prefill, p.decode),
            p.goodput_per_gpu,
            p.config
        );
    }
    if let Some(c) = &r.colocated {
        println!(
            "  {:>9}  {:>7.3} req/s/GPU  ({})",
            "colocated", c.goodput_per_gpu, c.config
        );
    }
    println!("\n{}", verdict(r));
    let capped = [r.best, r.best_colocated]
        .into_iter()
        .flatten()
        .any(|i| r.configs[i].found.capped);
    if capped {
        println!(
            "note: the search reached its ceiling (1,024× the trace's rate) still attaining (≥ in the table): the trace is too short or too light to load these GPUs, so the comparison is not conclusive; give it a longer trace"
        );
    }
    if let Some(w) = winner(r) {
        let rate = w.found.max_rate_req_s;
        let scale = w.found.rate_scale.unwrap_or(0.0);
        println!(
            "\npredicted: {} attains {:.0} % of requests within TTFT ≤ {} ms and TPOT ≤ {} ms up to {:.2} req/s (rate scale {:.3} of the trace)",
            w.label,
            a.attainment * 100.0,
            a.slo_ttft_ms,
            a.slo_tpot_ms,
            rate,
            scale
        );
        let pools = if w.config.mode == Mode::Colocated {
            format!("{} engines on {}", w.config.decode, hw.decode.profile.gpu)
        } else {
            format!(
                "{} prefill on {}, {} decode on {}",
                w.config.prefill, hw.prefill.profile.gpu, w.config.decode, hw.decode.profile.gpu
            )
        };
        println!(
            "\n# ---- tandem.toml ({pools}, {} GPU(s) each) ----\n{}",
            hw.gpus_per_engine(),
            toml_fragment(&w.config)
        );
        println!(
            "# ---- deploy/k8s/pools/kustomization.yaml ----\n{}",
            kustomize(&w.config)
        );
    }
    // The chosen configuration as `tandem bench trace` replays it (`mode = "always"` with a
    // `kv-capacity` decode pool, or colocated with `--prefill 0`; it cannot replay
    // `conditional`), and the best P/D one too when the chosen one is not P/D.
    let chosen = winner(r);
    let best_pd = r.best.map(|i| &r.configs[i]);
    let mut replays: Vec<(&str, &Evaluated)> = Vec::new();
    if let Some(w) = chosen {
        replays.push(("the chosen configuration", w));
    }
    if let Some(p) = best_pd.filter(|p| chosen.is_none_or(|w| !std::ptr::eq(*p, w))) {
        replays.push(("the best P/D configuration", p));
    }
    for (what, c) in replays {
        if let Some(cmd) = replay_command(a, c) {
            println!("# replay {what} in real time:\n# {cmd}");
        }
    }
    eprintln!(
        "{} configurations, {} fleet runs in {:.1} s",
        r.configs.len(),
        r.runs,
        r.wall_s
    );
    if let Some(path) = &a.json {
        std::fs::write(path, serde_json::to_string_pretty(r)?)?;
    }
    if let Some(dir) = &a.plot {
        std::fs::create_dir_all(dir)?;
        let chart = tandem_plot::goodput_vs_split(&curve(r))?;
        let [png, svg] = chart.write(dir, "goodput-vs-split")?;
        eprintln!("plots: {} {}", png.display(), svg.display());
    }
    Ok(())
}

/// The curve as the plotting crate takes it.
pub fn curve(r: &PlanResult) -> tandem_plot::SplitCurve {
    tandem_plot::SplitCurve {
        title: format!(
            "{}: goodput per GPU vs P:D split ({} GPUs)",
            r.trace, r.gpu_budget
        ),
        points: r
            .curve
            .iter()
            .map(|p| tandem_plot::SplitPoint {
                label: None,
                prefill: p.prefill,
                decode: p.decode,
                goodput_per_gpu: p.goodput_per_gpu,
            })
            .collect(),
        colocated_per_gpu: r.colocated.as_ref().map(|c| c.goodput_per_gpu),
        unit: "req/s per GPU".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::super::search::Found;
    use super::*;

    fn cand(mode: Mode, p: u32, policy: PolicyName, host: f64) -> Candidate {
        Candidate {
            prefill: p,
            decode: 16 - p,
            mode,
            prefill_policy: policy,
            decode_policy: if p == 0 {
                policy
            } else {
                PolicyName::KvCapacity
            },
            host_tier_gib: host,
        }
    }

    #[test]
    fn the_fragment_is_a_valid_configuration_with_the_chosen_keys() {
        let cases = [
            cand(Mode::Always, 6, PolicyName::Prefix, 200.0),
            cand(Mode::Conditional(2048), 4, PolicyName::LeastLoaded, 0.0),
            cand(Mode::Colocated, 0, PolicyName::Prefix, 0.0),
            cand(Mode::Colocated, 0, PolicyName::KvCapacity, 100.0),
        ];
        for c in cases {
            let text = toml_fragment(&c);
            let cfg = tandem_config::from_toml_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
            let mode = match c.mode {
                Mode::Always => tandem_config::DisaggregationMode::Always,
                Mode::Conditional(t) => {
                    assert_eq!(cfg.disaggregation.local_max_uncached_tokens, t);
                    tandem_config::DisaggregationMode::Conditional
                }
                Mode::Colocated => tandem_config::DisaggregationMode::Never,
            };
            assert_eq!(cfg.disaggregation.mode, mode, "{text}");
            assert_eq!(cfg.pools.prefill.endpoints.len(), c.prefill as usize);
            assert_eq!(cfg.pools.decode.endpoints.len(), c.decode as usize);
            if c.mode == Mode::Colocated {
                assert_eq!(cfg.pools.decode.policy, Some(c.prefill_policy));
            } else {
                assert_eq!(cfg.pools.prefill.policy, Some(c.prefill_policy));
                assert_eq!(
                    cfg.pools.target_ratio.map(|r| (r.prefill, r.decode)),
                    Some((c.prefill, c.decode))
                );
            }
            let k = kustomize(&c);
            assert!(
                k.contains(&format!("vllm-prefill\n    count: {}", c.prefill)),
                "{k}"
            );
            assert!(
                k.contains(&format!("vllm-decode\n    count: {}", c.decode)),
                "{k}"
            );
        }
    }

    /// The printed replay command is one `tandem bench trace` accepts, colocated as
    /// `--prefill 0` with the one policy, P/D with its decode policy when it is not the default,
    /// and none for `conditional`, which `bench trace` cannot replay.
    #[test]
    fn the_replay_command_is_one_bench_trace_accepts() {
        use clap::Parser;
        let cli = crate::Cli::try_parse_from(["tandem", "plan", "--file", "t.jsonl"]).unwrap();
        let crate::Command::Plan(a) = cli.command else {
            panic!("not plan")
        };
        let found = Found {
            rate_scale: Some(2.5),
            max_rate_req_s: 10.0,
            summary: None,
            probes: Vec::new(),
            capped: false,
        };
        let eval = |config: Candidate| Evaluated {
            config,
            label: String::new(),
            gpus: 16,
            found: found.clone(),
            goodput_per_gpu: 1.0,
        };
        let mut pd_both = cand(Mode::Always, 6, PolicyName::Prefix, 0.0);
        pd_both.decode_policy = PolicyName::LeastLoaded;
        let cases = [
            (
                cand(Mode::Colocated, 0, PolicyName::Prefix, 200.0),
                "--prefill 0 --decode 16 --compare prefix ",
            ),
            (
                cand(Mode::Always, 13, PolicyName::Prefix, 0.0),
                "--prefill 13 --decode 3 --compare prefix ",
            ),
            (
                pd_both,
                "--prefill 6 --decode 10 --compare prefix:least-loaded ",
            ),
        ];
        for (c, want) in cases {
            let host = c.host_tier_gib;
            let cmd = replay_command(&a, &eval(c)).expect("replayable");
            assert!(cmd.contains(want), "{cmd}");
            assert!(cmd.contains("--rate-scale 2.5000 --time-scale 1"), "{cmd}");
            assert_eq!(
                cmd.contains("--prefill-kv-offloading-gib 200"),
                host == 200.0,
                "{cmd}"
            );
            let argv = std::iter::once("tandem").chain(cmd.split_whitespace().skip(1));
            let parsed = crate::Cli::try_parse_from(argv).unwrap_or_else(|e| panic!("{e}\n{cmd}"));
            assert!(matches!(parsed.command, crate::Command::Bench(_)), "{cmd}");
        }
        let cond = cand(Mode::Conditional(1024), 13, PolicyName::Prefix, 0.0);
        assert_eq!(replay_command(&a, &eval(cond)), None);
        let mut none = eval(cand(Mode::Always, 8, PolicyName::Prefix, 0.0));
        none.found.rate_scale = None;
        assert_eq!(replay_command(&a, &none), None);
    }
}
