//! Small synthetic traces through whole fleets: each test checks a figure against the cost
//! model's own arithmetic or a property a fleet must have, deterministically.

use tandem_policy::{DisaggMode, PolicyKind};
use tandem_sim::cost::CostModel;
use tandem_sim::profile::{GpuKind, Profile};
use tandem_workload::{PromptSpec, Request, Segment, Slo, Source, Synthesizer, Trace};

use crate::{run, EngineSpec, FleetConfig, FleetReport};

const SLO: Slo = Slo {
    ttft_ms: 2000.0,
    tpot_ms: 100.0,
};

fn spec() -> EngineSpec {
    EngineSpec::new(Profile::new("llama-3.1-8b", GpuKind::H100, None).unwrap())
}

fn request(at_ms: f64, parts: &[(Source, u32)], output_tokens: u32) -> Request {
    Request {
        at_ms,
        input: PromptSpec {
            segments: parts
                .iter()
                .map(|&(source, len)| Segment { source, len })
                .collect(),
        },
        output_tokens,
    }
}

fn synth() -> Synthesizer {
    Synthesizer::new(0, 0..256).unwrap()
}

fn pd(p: usize, d: usize) -> FleetConfig {
    FleetConfig::disaggregated(vec![spec(); p], vec![spec(); d], SLO)
}

fn go(cfg: &FleetConfig, trace: &Trace) -> FleetReport {
    run(cfg, trace, &synth()).unwrap()
}

#[test]
fn one_request_costs_what_the_model_says() {
    // One 4,096-token prompt, 11 output tokens, 1P+1D, nothing else running: TTFT is c_req on
    // the prefill side, one 4,096-token prefill step, c_req on the decode side, the pull of
    // 4,096 tokens' KV (alone on both NICs) plus c_xfer, and one decode step that recomputes the
    // last prompt token; each later token is one decode step.
    let trace = Trace::new(
        "one",
        vec![request(0.0, &[(Source::Unique(1), 4096)], 11)],
        None,
    );
    let r = go(&pd(1, 1), &trace);
    let cost = CostModel::new(spec().profile);
    let c_req = cost.per_request_overhead().as_secs_f64();
    let prefill = cost.prefill_time(4096, 0).as_secs_f64() - c_req;
    let bytes = 4096 * spec().profile.kv_bytes_per_token();
    let link = spec().link;
    let pull = cost.transfer_time(bytes, link).as_secs_f64();
    // The last prompt token alone: a one-token chunk after 4,095 computed.
    let last = cost
        .step_time(&tandem_sim::cost::StepShape {
            prefill_chunks: vec![tandem_sim::cost::PrefillChunk {
                start: 4095,
                len: 1,
            }],
            ..Default::default()
        })
        .as_secs_f64();
    let expect = (2.0 * c_req + prefill + pull + last) * 1000.0;
    let s = &r.summary;
    assert_eq!(s.ok, 1);
    let ttft = s.ttft_ms.unwrap().p50;
    assert!((ttft - expect).abs() < 1e-6, "ttft {ttft} vs {expect}");
    // Decode steps of one sequence with a 4,097..4,106-token context: ITL is the model's.
    let itl = cost.decode_step_time(1, 4100).as_secs_f64() * 1000.0;
    let tpot = s.tpot_ms.unwrap().p50;
    assert!((tpot - itl).abs() / itl < 0.01, "tpot {tpot} vs {itl}");
    assert_eq!(r.stats.disaggregated, 1);
    assert_eq!(r.stats.unfinished, 0);
}

#[test]
fn prefix_routing_keeps_shared_prefixes_where_round_robin_spreads_them() {
    // 4 groups of 8 requests sharing a 4,096-token prefix, spaced out so caches stay warm.
    let mut reqs = Vec::new();
    for i in 0..32u64 {
        let g = i % 4;
        reqs.push(request(
            i as f64 * 400.0,
            &[(Source::Shared(g), 4096), (Source::Unique(i), 256)],
            8,
        ));
    }
    let trace = Trace::new("groups", reqs, None);
    let prefix = go(&pd(4, 2), &trace);
    let mut rr_cfg = pd(4, 2);
    rr_cfg.prefill_policy = PolicyKind::RoundRobin;
    let rr = go(&rr_cfg, &trace);
    let hp = prefix.summary.prefix_hit_rate.unwrap();
    let hr = rr.summary.prefix_hit_rate.unwrap();
    // Prefix routing misses each group once: 28 of 32 requests hit 4,096 of 4,352 tokens.
    let best = 28.0 * 4096.0 / (32.0 * 4352.0);
    assert!((hp - best).abs() < 1e-9, "prefix hit {hp} vs {best}");
    // Round-robin (seq % 4 = the group) happens to line up here too; shift it by one request.
    assert!(hr <= hp, "round-robin {hr} vs prefix {hp}");
    let mut shifted = trace.requests.clone();
    shifted.insert(0, request(0.0, &[(Source::Unique(999), 64)], 2));
    let rr2 = go(&rr_cfg, &Trace::new("shifted", shifted, None));
    let h2 = rr2.summary.prefix_hit_rate.unwrap();
    assert!(h2 < hp, "shifted round-robin {h2} vs prefix {hp}");
}

#[test]
fn runs_are_deterministic() {
    let reqs: Vec<Request> = (0..40u64)
        .map(|i| {
            request(
                i as f64 * 37.0,
                &[(Source::Shared(i % 3), 2048), (Source::Unique(i), 700)],
                16 + (i % 5) as u32,
            )
        })
        .collect();
    let trace = Trace::new("det", reqs, None);
    let cfg = pd(2, 2);
    let a = go(&cfg, &trace);
    let b = go(&cfg, &trace);
    assert_eq!(a.summary, b.summary);
    assert_eq!(a.stats.events, b.stats.events);
    assert_eq!(a.summary.ok, 40);
}

#[test]
fn colocated_engines_run_whole_requests_and_interfere() {
    // A long prefill arriving while a short request decodes: colocated, the decode waits for
    // the prefill chunks (chunked prefill shares its steps); disaggregated, it does not.
    let reqs = vec![
        request(0.0, &[(Source::Unique(1), 256)], 200),
        request(50.0, &[(Source::Unique(2), 32_000)], 2),
    ];
    let trace = Trace::new("interfere", reqs, None);
    let colo = go(
        &FleetConfig::colocated(vec![spec()], PolicyKind::KvCapacity, SLO),
        &trace,
    );
    assert_eq!(colo.stats.local, 2);
    assert_eq!(colo.stats.disaggregated, 0);
    let split = go(&pd(1, 1), &trace);
    let worst = |r: &FleetReport| r.summary.itl_ms.unwrap().max;
    assert!(
        worst(&colo) > 5.0 * worst(&split),
        "colocated worst ITL {} vs disaggregated {}",
        worst(&colo),
        worst(&split)
    );
}

#[test]
fn conditional_mode_keeps_short_prompts_local() {
    let reqs = vec![
        request(0.0, &[(Source::Unique(1), 100)], 4),
        request(10.0, &[(Source::Unique(2), 6000)], 4),
    ];
    let trace = Trace::new("cond", reqs, None);
    let mut cfg = pd(1, 1);
    cfg.disagg.mode = DisaggMode::Conditional;
    cfg.disagg.local_max_uncached_tokens = 1024;
    let r = go(&cfg, &trace);
    assert_eq!((r.stats.local, r.stats.disaggregated), (1, 1));
    assert_eq!(r.summary.ok, 2);
}

#[test]
fn a_small_decode_pool_waits_instead_of_preempting() {
    // Decode KV for two requests at a time: the rest wait in the admission queue at their
    // handoff, and every request still finishes.
    let reqs: Vec<Request> = (0..12u64)
        .map(|i| request(i as f64, &[(Source::Unique(i), 3000)], 64))
        .collect();
    let trace = Trace::new("tight", reqs, None);
    let mut cfg = pd(2, 1);
    cfg.decode[0].num_gpu_blocks = Some(2 * (3000 + 256) / 16 + 8);
    let r = go(&cfg, &trace);
    assert_eq!(r.summary.ok, 12);
    assert!(r.stats.held > 0, "{:?}", r.stats);
    assert_eq!(r.stats.unfinished, 0);
}

#[test]
fn a_host_tier_serves_what_the_gpu_evicted() {
    // One prefill engine with a tiny GPU cache: the first prompt is evicted by others before it
    // comes back; with a host tier its return is a hit.
    let mut reqs = vec![request(0.0, &[(Source::Shared(1), 8192)], 2)];
    for i in 0..6u64 {
        reqs.push(request(
            1000.0 + i as f64 * 500.0,
            &[(Source::Unique(i), 8192)],
            2,
        ));
    }
    reqs.push(request(6000.0, &[(Source::Shared(1), 8192)], 2));
    let trace = Trace::new("host", reqs, None);
    let mut cfg = pd(1, 1);
    cfg.prefill[0].num_gpu_blocks = Some(1200);
    let cold = go(&cfg, &trace);
    cfg.prefill[0].host_tier_gib = Some(64.0);
    let warm = go(&cfg, &trace);
    assert_eq!(cold.summary.cached_tokens, 0);
    assert!(
        warm.summary.cached_tokens >= 8176,
        "{}",
        warm.summary.cached_tokens
    );
}

#[test]
fn a_leg_overhead_delays_both_legs_and_nothing_else() {
    let trace = Trace::new(
        "one",
        vec![request(0.0, &[(Source::Unique(1), 2048)], 5)],
        None,
    );
    let base = go(&pd(1, 1), &trace);
    let mut cfg = pd(1, 1);
    cfg.leg_overhead_s = 0.025;
    let late = go(&cfg, &trace);
    let ttft = |r: &FleetReport| r.summary.ttft_ms.unwrap().p50;
    assert!((ttft(&late) - ttft(&base) - 50.0).abs() < 1e-6);
    // Decode steps are the same steps, only later (equal up to rounding of the later clock).
    let tpot = |r: &FleetReport| r.summary.tpot_ms.unwrap().p50;
    assert!(
        (tpot(&late) - tpot(&base)).abs() < 1e-9,
        "{} vs {}",
        tpot(&late),
        tpot(&base)
    );
}
