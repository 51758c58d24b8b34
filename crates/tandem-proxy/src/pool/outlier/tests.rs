//! The outlier state machine with explicit times, and the tracker against a pool table.

use std::sync::Arc;
use std::time::Duration;

use tandem_config::OutlierConfig;
use tandem_policy::{Health, PoolKind};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::*;
use crate::engine::EngineClient;
use crate::pool::{new_entry, Pools};
use crate::tls::EngineTls;

fn cfg() -> OutlierConfig {
    OutlierConfig {
        consecutive_failures: 3,
        base_ejection_ms: 1_000,
        max_ejection_ms: 2_500,
        max_ejection_percent: 50,
        slow_start_ms: 1_000,
        slow_start_min_percent: 10,
    }
}

fn ms(t0: Instant, v: u64) -> Instant {
    t0 + Duration::from_millis(v)
}

#[test]
fn consecutive_failures_eject_and_a_success_resets_the_count() {
    let c = cfg();
    let mut o = Outlier::default();
    assert!(!o.failure(Failure::Status, &c));
    assert!(!o.failure(Failure::Timeout, &c));
    o.success(false);
    assert_eq!(o.consecutive(), 0);
    assert!(!o.failure(Failure::Status, &c));
    assert!(!o.failure(Failure::Status, &c));
    assert!(o.failure(Failure::Connection, &c), "the third in a row");
    // A KV transfer's success does not reset the legs' count, nor the other way round.
    o.success(true);
    assert_eq!(o.consecutive(), 3);
    let mut kv = Outlier::default();
    kv.failure(Failure::KvTransfer, &c);
    kv.failure(Failure::KvTransfer, &c);
    kv.success(false);
    assert!(kv.failure(Failure::KvTransfer, &c));
    // consecutive_failures = 0: never.
    let off = OutlierConfig {
        consecutive_failures: 0,
        ..cfg()
    };
    let mut o = Outlier::default();
    assert!((0..100).all(|_| !o.failure(Failure::Status, &off)));
}

#[test]
fn ejections_grow_by_the_base_up_to_the_max_and_decay_while_back() {
    let c = cfg();
    let t0 = Instant::now();
    let mut o = Outlier::default();
    let lengths: Vec<u64> = [0, 10_000, 20_000]
        .into_iter()
        .map(|at| {
            let now = ms(t0, at);
            let l = o.eject(now, Failure::Status, &c).as_millis() as u64;
            // Back at once (time passed, good probe).
            assert!(o.probed(now + Duration::from_millis(l), true));
            l
        })
        .collect();
    // Back for 10 s - 1 s and 10 s - 2 s each time: 9 and 8 base steps, more than the
    // multiplier, so each ejection is a first one again...
    assert_eq!(lengths, [1_000, 1_000, 1_000]);
    // ...while ejections close together grow: 1 s, 2 s, then capped at 2.5 s.
    let mut o = Outlier::default();
    let mut now = t0;
    let mut got = Vec::new();
    for _ in 0..3 {
        let l = o.eject(now, Failure::Status, &c);
        got.push(l.as_millis() as u64);
        now += l;
        assert!(o.probed(now, true));
    }
    assert_eq!(got, [1_000, 2_000, 2_500]);
    assert_eq!(o.view(1.0).ejections, 3);
    assert_eq!(o.view(1.0).last_reason, Some(Failure::Status));
}

#[test]
fn an_ejected_engine_returns_only_after_its_time_and_a_good_probe() {
    let c = cfg();
    let t0 = Instant::now();
    let mut o = Outlier::default();
    for _ in 0..3 {
        o.failure(Failure::Status, &c);
    }
    o.eject(t0, Failure::Status, &c);
    assert!(o.is_ejected());
    assert_eq!(o.view(1.0).state, State::Ejected);
    assert_eq!(o.view(1.0).ejected_until, Some(ms(t0, 1_000)));
    // Reports from legs still in flight change nothing while it is out.
    assert!(!o.failure(Failure::Status, &c));
    o.success(false);
    assert_eq!(o.consecutive(), 3);
    assert!(!o.probed(ms(t0, 500), true), "too early");
    assert!(!o.probed(ms(t0, 1_000), false), "time passed, probe failed");
    assert!(o.is_ejected());
    assert!(o.probed(ms(t0, 1_200), true));
    assert!(!o.is_ejected());
    assert_eq!(o.consecutive(), 0, "counts start afresh");
}

#[test]
fn slow_start_ramps_the_weight_linearly_from_the_floor() {
    let c = cfg();
    let t0 = Instant::now();
    let mut o = Outlier::default();
    // Routable from the start, alone: no slow start.
    o.routable(true, false, t0, &c);
    assert_eq!(o.weight_factor(t0, &c), 1.0);
    // Out (failing probes), then back while others serve: 10 % rising to 100 % over 1 s.
    o.routable(false, true, ms(t0, 10), &c);
    o.failure(Failure::Status, &c);
    o.failure(Failure::KvTransfer, &c);
    o.routable(true, true, ms(t0, 100), &c);
    assert_eq!(o.view(1.0).state, State::SlowStart);
    assert_eq!(o.consecutive(), 0, "failures while out do not carry over");
    assert_eq!(o.view(1.0).consecutive_kv_failures, 0);
    let at = |o: &mut Outlier, t| o.weight_factor(ms(t0, t), &c);
    assert!((at(&mut o, 100) - 0.1).abs() < 1e-9);
    assert!((at(&mut o, 600) - 0.55).abs() < 1e-9);
    assert!((at(&mut o, 1_050) - 0.955).abs() < 1e-9);
    assert_eq!(at(&mut o, 1_100), 1.0);
    assert_eq!(o.view(1.0).state, State::Active, "the ramp is over");
    // slow_start_ms = 0: straight back to full weight.
    let off = OutlierConfig {
        slow_start_ms: 0,
        ..cfg()
    };
    let mut o = Outlier::default();
    o.routable(true, true, t0, &off);
    assert_eq!(o.view(1.0).state, State::Active);
}

/// A pool table of `n` healthy HTTP engines in `kind` (ids from `first`), no other pool.
fn pools(kind: PoolKind, first: usize, n: usize) -> Pools {
    let freed = Arc::new(Notify::new());
    let entries = (first..first + n)
        .map(|id| {
            let url = format!("http://127.0.0.{}:9", id + 1);
            let client = EngineClient::new(
                tandem_config::Protocol::Http,
                &url,
                None,
                Duration::from_secs(1),
                &EngineTls::none(),
            );
            let mut e = new_entry(id, kind, &url, (1.0, "default"), false, client, &freed);
            e.status.probed = Health::Healthy;
            e.status.health = Health::Healthy;
            e
        })
        .collect();
    let mut p = Pools {
        probed: true,
        ..Pools::default()
    };
    match kind {
        PoolKind::Prefill => p.prefill = entries,
        PoolKind::Decode => p.decode = entries,
    }
    p
}

fn fail(id: usize, pool: PoolKind, kv_from: Option<usize>) -> Outcome {
    Outcome {
        pool,
        id,
        result: Err(Some(Failure::Status)),
        reprobe: false,
        kv_from,
    }
}

fn ok(id: usize, pool: PoolKind, kv_from: Option<usize>) -> Outcome {
    Outcome {
        result: Ok(()),
        ..fail(id, pool, kv_from)
    }
}

fn health(p: &Pools, kind: PoolKind) -> Vec<Health> {
    p.pool(kind).iter().map(|e| e.status.health).collect()
}

#[tokio::test(start_paused = true)]
async fn at_most_the_ejection_share_and_never_the_last_routable_engine() {
    let m = Metrics::new(None, true);
    let d = PoolKind::Decode;
    let now = Instant::now();
    // Four engines at 50 %: two may be out, not three.
    let mut p = pools(d, 0, 4);
    let mut t = Outliers::new(&cfg());
    t.settle(&mut p, |_, _| Some(true), now);
    let mut ejected = Vec::new();
    for id in 0..4 {
        let mut any = false;
        for _ in 0..3 {
            any |= t.record(&p, &fail(id, d, None), now, &m);
        }
        ejected.push(any);
        t.settle(&mut p, |_, _| None, now);
    }
    assert_eq!(ejected, [true, true, false, false]);
    use Health::{Ejected, Healthy};
    assert_eq!(health(&p, d), [Ejected, Ejected, Healthy, Healthy]);
    let v = p.decode[0].status.outlier;
    assert_eq!((v.state, v.ejections), (State::Ejected, 1));

    // Two engines at 100 %: one may go, never both.
    let mut p = pools(d, 0, 2);
    let mut t = Outliers::new(&OutlierConfig {
        max_ejection_percent: 100,
        ..cfg()
    });
    t.settle(&mut p, |_, _| Some(true), now);
    for id in 0..2 {
        for _ in 0..3 {
            t.record(&p, &fail(id, d, None), now, &m);
        }
    }
    t.settle(&mut p, |_, _| None, now);
    assert_eq!(health(&p, d), [Ejected, Healthy]);
    // One engine alone is never ejected.
    let mut p = pools(d, 0, 1);
    let mut t = Outliers::new(&cfg());
    t.settle(&mut p, |_, _| Some(true), now);
    assert!(!(0..10).any(|_| t.record(&p, &fail(0, d, None), now, &m)));
}

#[tokio::test(start_paused = true)]
async fn an_ejected_engine_comes_back_through_slow_start_at_a_good_probe() {
    let m = Metrics::new(None, true);
    let d = PoolKind::Decode;
    let t0 = Instant::now();
    let mut p = pools(d, 0, 2);
    let mut t = Outliers::new(&cfg());
    t.settle(&mut p, |_, _| Some(true), t0);
    assert_eq!(
        p.decode[0].status.outlier.state,
        State::Active,
        "no slow start at start-up"
    );
    for _ in 0..3 {
        t.record(&p, &fail(0, d, None), t0, &m);
    }
    t.settle(&mut p, |_, _| None, t0);
    assert_eq!(p.decode[0].status.health, Health::Ejected);
    assert!(!p.snapshot().decode[0].routable());
    // Time passed but the probe failed: still out (and the probes' verdict shows).
    t.settle(&mut p, |_, _| Some(false), ms(t0, 1_000));
    assert_eq!(p.decode[0].status.outlier.state, State::Ejected);
    // Good probe: back, at 10 % of its weight, ramping.
    t.settle(&mut p, |_, _| Some(true), ms(t0, 1_100));
    let e = &p.decode[0];
    assert_eq!(e.status.health, Health::Healthy);
    assert_eq!(e.status.outlier.state, State::SlowStart);
    assert!((p.snapshot().decode[0].weight - 0.1).abs() < 1e-9);
    t.settle(&mut p, |_, _| Some(true), ms(t0, 1_600));
    assert!((p.snapshot().decode[0].weight - 0.55).abs() < 1e-9);
    t.settle(&mut p, |_, _| Some(true), ms(t0, 2_100));
    assert_eq!(p.decode[0].status.outlier.state, State::Active);
    assert_eq!(p.snapshot().decode[0].weight, 1.0);
    // An engine that left the table takes its state with it.
    p.decode.remove(0);
    t.settle(&mut p, |_, _| None, ms(t0, 2_200));
    assert!(!t.engines.contains_key(&0));
}

#[tokio::test(start_paused = true)]
async fn a_failed_transfer_charges_the_prefill_engine_once_per_decode_failure_run() {
    let m = Metrics::new(None, true);
    let (pk, dk) = (PoolKind::Prefill, PoolKind::Decode);
    let now = Instant::now();
    let mut p = pools(pk, 0, 2);
    p.decode = pools(dk, 2, 2).decode;
    let mut t = Outliers::new(&cfg());
    t.settle(&mut p, |_, _| Some(true), now);
    // Decode engine 2 fails everything with prefill 0's KV: 2 is ejected, 0 charged once.
    let ejected: Vec<bool> = (0..3)
        .map(|_| t.record(&p, &fail(2, dk, Some(0)), now, &m))
        .collect();
    assert_eq!(ejected, [false, false, true]);
    t.settle(&mut p, |_, _| None, now);
    assert_eq!(p.prefill[0].status.outlier.consecutive_kv_failures, 1);
    assert_eq!(p.decode[0].status.health, Health::Ejected);
    assert_eq!(p.prefill[0].status.health, Health::Healthy);

    // Prefill 1's KV cannot be read: decode 3, fine otherwise, fails each transfer from it and
    // succeeds with others'; prefill 1 is ejected for kv_transfer.
    let mut out = false;
    for _ in 0..3 {
        out |= t.record(&p, &fail(3, dk, Some(1)), now, &m);
        t.record(&p, &ok(3, dk, Some(0)), now, &m);
    }
    assert!(out);
    t.settle(&mut p, |_, _| None, now);
    assert_eq!(p.prefill[1].status.health, Health::Ejected);
    assert_eq!(
        p.prefill[1].status.outlier.last_reason,
        Some(Failure::KvTransfer)
    );
    assert_eq!(
        p.decode[1].status.health,
        Health::Healthy,
        "decode 3 stays in"
    );
    // And prefill 0's transfers that worked cleared its charge.
    assert_eq!(p.prefill[0].status.outlier.consecutive_kv_failures, 0);
}

#[tokio::test(start_paused = true)]
async fn failures_that_missed_the_queue_still_count() {
    let m = Metrics::new(None, true);
    let d = PoolKind::Decode;
    let now = Instant::now();
    let mut p = pools(d, 0, 2);
    let mut t = Outliers::new(&cfg());
    t.settle(&mut p, |_, _| Some(true), now);
    let engine = p.decode[0].engine.clone();
    engine.missed.add(Failure::Timeout);
    engine.missed.add(Failure::Timeout);
    assert!(!t.drain_missed(&p, now, &m));
    engine.missed.add(Failure::Status);
    assert!(t.drain_missed(&p, now, &m));
    assert_eq!(engine.missed.take(), [0; 4], "drained");
    t.settle(&mut p, |_, _| None, now);
    assert_eq!(p.decode[0].status.health, Health::Ejected);
}

#[tokio::test]
async fn a_full_queue_keeps_failures_and_drops_successes() {
    let p = pools(PoolKind::Decode, 0, 1);
    let (tx, mut rx) = tokio::sync::mpsc::channel(1);
    let (_wtx, wrx) = tokio::sync::watch::channel(Arc::new(Pools::default()));
    let h = PoolHandle {
        pools: wrx,
        outcomes: tx,
        freed: Arc::new(Notify::new()),
    };
    let e = &p.decode[0].engine;
    h.succeeded(e, None);
    h.succeeded(e, None);
    h.failed(e, ErrorKind::Status5xx, false, None);
    h.failed(e, ErrorKind::Task, true, None);
    assert!(rx.try_recv().unwrap().result.is_ok());
    assert!(rx.try_recv().is_err());
    assert_eq!(e.missed.take(), [1, 0, 0, 0]);
}
