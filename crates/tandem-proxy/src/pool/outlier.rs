//! Outlier detection and slow start (`[outlier]`), as Envoy does them.
//!
//! Request legs report how each one went ([`PoolHandle::succeeded`], [`PoolHandle::failed`]);
//! the control loop, the only writer of this state, counts failures in a row per engine and
//! ejects one that reaches `consecutive_failures`, for `base_ejection_ms × n` (the n-th ejection
//! in a row, at most `max_ejection_ms`), unless that would put more than `max_ejection_percent`
//! of its pool out or leave the pool without a routable engine. An ejected engine comes back
//! once its time has passed *and* a health probe succeeds (passive and active signals combined),
//! then ramps its weight up over `slow_start_ms`, as does an engine that recovers from failing
//! probes or is discovered while its pool already serves.
//!
//! A failed KV transfer is the prefill engine's fault as often as the decode engine's, and shows
//! only as a failed decode leg. It is counted against the prefill engine on its own counter,
//! reset only by a transfer from that engine that worked, and only when the decode engine's
//! previous leg had succeeded: a decode engine that fails everything then charges each prefill
//! engine at most once per run of failures, while a prefill engine whose KV cannot be read
//! collects a charge from every healthy decode engine that tries.
//!
//! The request path pays one `try_send` per leg. When the channel is full a success is dropped
//! (it would only have reset a count), but a failure is added to the engine's [`Missed`]
//! counters, which the control loop drains with the channel, so no failure goes uncounted.
//!
//! [`Outlier`] is the pure per-engine state machine (time comes in as arguments); [`Outliers`]
//! applies it to the pools.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tandem_config::OutlierConfig;
use tandem_policy::{Health, PoolKind};
use tokio::sync::mpsc::error::TrySendError;
use tokio::time::Instant;

use super::{Engine, PoolHandle, Pools};
use crate::engine::error::ErrorKind;
use crate::metrics::Metrics;

/// Why a leg failed, as outlier detection counts it. Bounded: the `reason` label of
/// `tandem_engine_ejections_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Failure {
    /// An error answer: HTTP 5xx, a gRPC server error, an error event, an unreadable answer.
    Status,
    /// No answer in time.
    Timeout,
    /// No connection, or one that broke.
    Connection,
    /// A decode engine could not use the prefill's KV (counted against the prefill engine).
    KvTransfer,
}

impl Failure {
    const ALL: [Failure; 4] = [
        Failure::Status,
        Failure::Timeout,
        Failure::Connection,
        Failure::KvTransfer,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Failure::Status => "5xx",
            Failure::Timeout => "timeout",
            Failure::Connection => "connection",
            Failure::KvTransfer => "kv_transfer",
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    /// How a leg's failure counts; `None` for Tandem's own (a task that failed).
    pub fn of(kind: ErrorKind) -> Option<Failure> {
        Some(match kind {
            ErrorKind::Status5xx | ErrorKind::ErrorEvent | ErrorKind::BadResponse => {
                Failure::Status
            }
            ErrorKind::Timeout | ErrorKind::HandoffTimeout | ErrorKind::FirstTokenTimeout => {
                Failure::Timeout
            }
            ErrorKind::Connect | ErrorKind::Send | ErrorKind::Read | ErrorKind::StreamBroken => {
                Failure::Connection
            }
            ErrorKind::Task => return None,
        })
    }
}

/// One leg's report to the control loop.
#[derive(Debug, Clone, Copy)]
pub struct Outcome {
    pub pool: PoolKind,
    pub id: usize,
    /// `Err`: the failure; `None` inside when it does not count (only a re-probe is asked).
    pub result: Result<(), Option<Failure>>,
    /// The engine looks down: probe it now.
    pub reprobe: bool,
    /// A decode leg that delivered a prefill's KV params: that prefill engine's id.
    pub kv_from: Option<usize>,
}

/// Failures that found the channel full, by [`Failure`]; drained by the control loop.
#[derive(Debug, Default)]
pub struct Missed([AtomicU32; 4]);

impl Missed {
    fn add(&self, f: Failure) {
        self.0[f.index()].fetch_add(1, Ordering::Relaxed);
    }

    fn take(&self) -> [u32; 4] {
        std::array::from_fn(|i| self.0[i].swap(0, Ordering::Relaxed))
    }
}

impl PoolHandle {
    /// A leg on `engine` went well (an answer, or the engine's own refusal of the request);
    /// `kv_from`: the prefill engine whose KV this decode leg used.
    pub fn succeeded(&self, engine: &Engine, kv_from: Option<usize>) {
        self.report(
            engine,
            Outcome {
                pool: engine.pool,
                id: engine.id,
                result: Ok(()),
                reprobe: false,
                kv_from,
            },
        );
    }

    /// A leg on `engine` failed with `kind`; `reprobe`: the engine itself looks unwell;
    /// `kv_from`: the prefill engine whose KV params this decode leg delivered.
    pub fn failed(&self, engine: &Engine, kind: ErrorKind, reprobe: bool, kv_from: Option<usize>) {
        self.report(
            engine,
            Outcome {
                pool: engine.pool,
                id: engine.id,
                result: Err(Failure::of(kind)),
                reprobe,
                kv_from,
            },
        );
    }

    fn report(&self, engine: &Engine, o: Outcome) {
        if let Err(TrySendError::Full(o)) = self.outcomes.try_send(o) {
            // A full queue means the control loop is behind; a failure must still count.
            if let Err(Some(f)) = o.result {
                engine.missed.add(f);
            }
        }
    }
}

/// What outlier detection shows of an engine: in `/admin/engines`, and the weight policies see.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OutlierView {
    pub state: State,
    /// Ejections since the engine entered the table.
    pub ejections: u32,
    /// While ejected: when the ejection time ends (the engine returns at the first good probe
    /// after it).
    pub ejected_until: Option<Instant>,
    pub consecutive_failures: u32,
    pub consecutive_kv_failures: u32,
    /// The fraction of its configured weight the engine has now (below 1 in slow start).
    pub weight_factor: f64,
    /// What the last ejection was for.
    pub last_reason: Option<Failure>,
}

impl OutlierView {
    /// `/admin/engines`' `outlier` object; `weight` is the engine's configured weight.
    pub fn json(&self, weight: f64, now: Instant) -> serde_json::Value {
        let remaining = self.ejected_until.map(|t| t.saturating_duration_since(now));
        let until_unix_ms = remaining.map(|r| {
            (std::time::SystemTime::now() + r)
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64)
        });
        serde_json::json!({
            "state": self.state.as_str(),
            "ejections": self.ejections,
            "ejected_until_ms": until_unix_ms,
            "ejection_remaining_ms": remaining.map(|r| r.as_millis() as u64),
            "consecutive_failures": self.consecutive_failures,
            "consecutive_kv_failures": self.consecutive_kv_failures,
            "last_ejection_reason": self.last_reason.map(Failure::as_str),
            "effective_weight": weight * self.weight_factor,
        })
    }
}

impl Default for OutlierView {
    fn default() -> Self {
        OutlierView {
            state: State::Active,
            ejections: 0,
            ejected_until: None,
            consecutive_failures: 0,
            consecutive_kv_failures: 0,
            weight_factor: 1.0,
            last_reason: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Active,
    Ejected,
    SlowStart,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Active => "active",
            State::Ejected => "ejected",
            State::SlowStart => "slow_start",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    Active,
    Ejected { until: Instant },
    SlowStart { since: Instant },
}

/// One engine's outlier state. Pure: every method takes the time it happens at.
#[derive(Debug, Clone)]
pub struct Outlier {
    phase: Phase,
    consecutive: u32,
    consecutive_kv: u32,
    ejections: u32,
    /// The next ejection lasts `base × (multiplier + 1)` (after decay).
    multiplier: u32,
    /// When the engine last came back, from which the multiplier decays.
    back_since: Option<Instant>,
    last_reason: Option<Failure>,
    /// Whether it was routable at the last [`Outlier::routable`].
    routable: bool,
}

impl Default for Outlier {
    fn default() -> Self {
        Outlier {
            phase: Phase::Active,
            consecutive: 0,
            consecutive_kv: 0,
            ejections: 0,
            multiplier: 0,
            back_since: None,
            last_reason: None,
            routable: false,
        }
    }
}

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

impl Outlier {
    pub fn is_ejected(&self) -> bool {
        matches!(self.phase, Phase::Ejected { .. })
    }

    /// Failures in a row so far (legs; KV transfers count apart).
    pub fn consecutive(&self) -> u32 {
        self.consecutive
    }

    /// Count a failure; `true` when the engine has now failed often enough in a row to be
    /// ejected. Reports of legs still in flight when it was ejected change nothing.
    pub fn failure(&mut self, f: Failure, cfg: &OutlierConfig) -> bool {
        if self.is_ejected() {
            return false;
        }
        let n = match f {
            Failure::KvTransfer => &mut self.consecutive_kv,
            _ => &mut self.consecutive,
        };
        *n = n.saturating_add(1);
        cfg.ejects() && *n >= cfg.consecutive_failures
    }

    /// A success resets its count (a KV transfer's, or the legs').
    pub fn success(&mut self, kv: bool) {
        if self.is_ejected() {
            return;
        }
        if kv {
            self.consecutive_kv = 0;
        } else {
            self.consecutive = 0;
        }
    }

    /// Take the engine out until `now + base × n` (at most the max), where `n` counts this
    /// ejection and those before it, less one for each `base` the engine has since spent back.
    pub fn eject(&mut self, now: Instant, reason: Failure, cfg: &OutlierConfig) -> Duration {
        let base = ms(cfg.base_ejection_ms);
        if let Some(back) = self.back_since.take() {
            let served = now.saturating_duration_since(back).as_millis();
            let steps = served / u128::from(cfg.base_ejection_ms.max(1));
            self.multiplier = self
                .multiplier
                .saturating_sub(u32::try_from(steps).unwrap_or(u32::MAX));
        }
        self.multiplier = self.multiplier.saturating_add(1);
        self.ejections = self.ejections.saturating_add(1);
        self.last_reason = Some(reason);
        let length = base
            .saturating_mul(self.multiplier)
            .min(ms(cfg.max_ejection_ms));
        self.phase = Phase::Ejected {
            until: now + length,
        };
        length
    }

    /// A probe finished: an ejected engine whose time has passed comes back at a good one
    /// (`true` then), with its counts reset.
    pub fn probed(&mut self, now: Instant, ok: bool) -> bool {
        match self.phase {
            Phase::Ejected { until } if ok && now >= until => {
                self.phase = Phase::Active;
                self.consecutive = 0;
                self.consecutive_kv = 0;
                self.back_since = Some(now);
                true
            }
            _ => false,
        }
    }

    /// Whether the engine can be routed to now (healthy and not ejected); `others`: whether
    /// another engine of its pool can. An engine that becomes routable while others serve
    /// starts its slow start (alone in its pool, it takes everything whatever its weight).
    /// Counts start afresh whenever it becomes routable: failures seen while probes held it out
    /// say nothing about the engine the probes now pass.
    pub fn routable(&mut self, routable: bool, others: bool, now: Instant, cfg: &OutlierConfig) {
        if routable && !self.routable {
            self.consecutive = 0;
            self.consecutive_kv = 0;
            if others && cfg.slow_start_ms > 0 {
                self.phase = Phase::SlowStart { since: now };
            }
        }
        self.routable = routable;
    }

    /// The fraction of its weight the engine gets now: from `slow_start_min_percent` to all of
    /// it, linearly over `slow_start_ms`; the slow start ends when it has passed.
    pub fn weight_factor(&mut self, now: Instant, cfg: &OutlierConfig) -> f64 {
        let Phase::SlowStart { since } = self.phase else {
            return 1.0;
        };
        let window = ms(cfg.slow_start_ms);
        let elapsed = now.saturating_duration_since(since);
        if window.is_zero() || elapsed >= window {
            self.phase = Phase::Active;
            return 1.0;
        }
        let floor = f64::from(cfg.slow_start_min_percent) / 100.0;
        floor + (1.0 - floor) * (elapsed.as_secs_f64() / window.as_secs_f64())
    }

    pub fn view(&self, weight_factor: f64) -> OutlierView {
        let (state, ejected_until) = match self.phase {
            Phase::Active => (State::Active, None),
            Phase::Ejected { until } => (State::Ejected, Some(until)),
            Phase::SlowStart { .. } => (State::SlowStart, None),
        };
        OutlierView {
            state,
            ejections: self.ejections,
            ejected_until,
            consecutive_failures: self.consecutive,
            consecutive_kv_failures: self.consecutive_kv,
            weight_factor,
            last_reason: self.last_reason,
        }
    }
}

/// Every engine's [`Outlier`], owned by the control loop.
#[derive(Debug)]
pub(super) struct Outliers {
    cfg: OutlierConfig,
    engines: HashMap<usize, Outlier>,
}

impl Outliers {
    pub fn new(cfg: &OutlierConfig) -> Self {
        Outliers {
            cfg: cfg.clone(),
            engines: HashMap::new(),
        }
    }

    /// Apply one report against the pools as published; `true` when an engine was ejected (the
    /// pools must then be settled and published).
    pub fn record(&mut self, pools: &Pools, o: &Outcome, now: Instant, metrics: &Metrics) -> bool {
        let mut ejected = false;
        match o.result {
            Ok(()) => {
                self.entry(o.id).success(false);
                if let Some(p) = o.kv_from {
                    self.entry(p).success(true);
                }
            }
            Err(None) => {}
            Err(Some(f)) => {
                // Charge the prefill engine only if this decode engine's last leg had worked.
                let decode_was_fine = self.entry(o.id).consecutive() == 0;
                ejected |= self.fail(pools, o.pool, o.id, f, now, metrics);
                if let (Some(p), true) = (o.kv_from, decode_was_fine) {
                    ejected |= self.fail(
                        pools,
                        PoolKind::Prefill,
                        p,
                        Failure::KvTransfer,
                        now,
                        metrics,
                    );
                }
            }
        }
        ejected
    }

    /// Count failures that found the channel full (see [`Missed`]).
    pub fn drain_missed(&mut self, pools: &Pools, now: Instant, metrics: &Metrics) -> bool {
        let mut ejected = false;
        for kind in [PoolKind::Prefill, PoolKind::Decode] {
            for e in pools.pool(kind) {
                let missed = e.engine.missed.take();
                for (f, n) in Failure::ALL.into_iter().zip(missed) {
                    for _ in 0..n {
                        ejected |= self.fail(pools, kind, e.engine.id, f, now, metrics);
                    }
                }
            }
        }
        ejected
    }

    fn entry(&mut self, id: usize) -> &mut Outlier {
        self.engines.entry(id).or_default()
    }

    fn fail(
        &mut self,
        pools: &Pools,
        kind: PoolKind,
        id: usize,
        f: Failure,
        now: Instant,
        metrics: &Metrics,
    ) -> bool {
        let cfg = self.cfg.clone();
        if !self.entry(id).failure(f, &cfg) {
            return false;
        }
        let Some(e) = pools.find(kind, id) else {
            return false;
        };
        let url = &e.engine.url;
        if e.status.health != Health::Healthy {
            // Already out of rotation (failing probes, draining): nothing to take out.
            return false;
        }
        let pool = pools.pool(kind);
        let out = pool.iter().filter(|e| self.ejected(e.engine.id)).count();
        let others = pool
            .iter()
            .filter(|o| o.engine.id != id)
            .any(|o| o.status.health == Health::Healthy && !self.ejected(o.engine.id));
        // Envoy's rule: the pool's ejected share, this one included, within the percentage.
        let within = (out + 1) * 100 <= cfg.max_ejection_percent as usize * pool.len();
        if !(within && others) {
            metrics.outlier.skipped(kind, url);
            if self.entry(id).consecutive() == cfg.consecutive_failures {
                tracing::warn!(pool = kind.as_str(), engine = %url, reason = f.as_str(),
                    "engine keeps failing but is not ejected: its pool is at outlier.max_ejection_percent or has no other routable engine");
            }
            return false;
        }
        let length = self.entry(id).eject(now, f, &cfg);
        metrics.outlier.ejected(kind, url, f.as_str());
        tracing::warn!(pool = kind.as_str(), engine = %url, reason = f.as_str(),
            ejection_ms = length.as_millis() as u64, "engine ejected: too many failures in a row");
        true
    }

    fn ejected(&self, id: usize) -> bool {
        self.engines.get(&id).is_some_and(Outlier::is_ejected)
    }

    /// Bring `pools` in line with outlier state before they are published: returns of ejected
    /// engines at a good probe (`probed` gives this round's probe results), slow starts, the
    /// weight each engine has now, and `Health::Ejected` over the probes' verdict while out.
    pub fn settle(
        &mut self,
        pools: &mut Pools,
        probed: impl Fn(PoolKind, usize) -> Option<bool>,
        now: Instant,
    ) {
        let cfg = self.cfg.clone();
        for kind in [PoolKind::Prefill, PoolKind::Decode] {
            let pool = match kind {
                PoolKind::Prefill => &mut pools.prefill,
                PoolKind::Decode => &mut pools.decode,
            };
            // Routable as of the last settle (none at start-up, so nothing slow-starts then).
            let before: Vec<bool> = pool
                .iter()
                .map(|e| self.engines.get(&e.engine.id).is_some_and(|o| o.routable))
                .collect();
            for (i, e) in pool.iter_mut().enumerate() {
                let o = self.engines.entry(e.engine.id).or_default();
                if let Some(ok) = probed(kind, e.engine.id) {
                    if o.probed(now, ok && e.status.probed == Health::Healthy) {
                        tracing::info!(pool = kind.as_str(), engine = %e.engine.url,
                            "ejected engine back in rotation");
                    }
                }
                let draining = e.status.health == Health::Draining;
                let routable = !draining && e.status.probed == Health::Healthy && !o.is_ejected();
                let others = before.iter().enumerate().any(|(j, r)| j != i && *r);
                o.routable(routable, others, now, &cfg);
                let factor = o.weight_factor(now, &cfg);
                e.status.outlier = o.view(factor);
                if !draining {
                    e.status.health = if o.is_ejected() && e.status.probed == Health::Healthy {
                        Health::Ejected
                    } else {
                        e.status.probed
                    };
                }
            }
        }
        // Engines that left the table take their state with them.
        let live: std::collections::HashSet<usize> = pools
            .prefill
            .iter()
            .chain(pools.decode.iter())
            .map(|e| e.engine.id)
            .collect();
        self.engines.retain(|id, _| live.contains(id));
    }
}

#[cfg(test)]
mod tests;
