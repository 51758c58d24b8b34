//! The in-process budgets: a token bucket per tenant and dimension (requests, tokens), and the
//! tenant's requests in flight. The bucket maths is pure (time is an argument, in ms); the Redis
//! script (`redis.rs`) computes the same thing on the server's clock.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use tandem_config::TenantLimits;

/// The refill period: each bucket holds a minute's budget and refills it over a minute.
pub(crate) const WINDOW_MS: f64 = 60_000.0;

/// A bucket of capacity `cap` refilled at `cap` per minute: its level at `at_ms`. A new bucket
/// is full. Output tokens may take it below zero (they are counted as they stream, after the
/// request was admitted); the deficit holds back the tenant's next requests until refilled.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Bucket {
    level: f64,
    at_ms: u64,
}

impl Bucket {
    pub fn full(cap: u64, now_ms: u64) -> Bucket {
        Bucket {
            level: cap as f64,
            at_ms: now_ms,
        }
    }

    /// The level at `now_ms` (an earlier `now_ms` counts as `at_ms`).
    pub fn level(&self, cap: u64, now_ms: u64) -> f64 {
        let dt = now_ms.saturating_sub(self.at_ms) as f64;
        (self.level + dt * cap as f64 / WINDOW_MS).min(cap as f64)
    }

    /// Take `n` (a negative `n` gives back, never past full).
    pub fn take(&mut self, cap: u64, now_ms: u64, n: f64) {
        self.level = (self.level(cap, now_ms) - n).min(cap as f64);
        self.at_ms = self.at_ms.max(now_ms);
    }
}

/// Milliseconds until a bucket at `level` holds `need`.
pub(crate) fn ms_until(level: f64, need: f64, cap: u64) -> u64 {
    if level >= need {
        0
    } else {
        ((need - level) * WINDOW_MS / cap as f64).ceil() as u64
    }
}

/// A check's result: whether the request may go, and both buckets' levels after it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Levels {
    pub admitted: bool,
    /// `None` where the tenant has no such limit.
    pub requests: Option<f64>,
    pub tokens: Option<f64>,
}

#[derive(Debug, Default)]
struct Buckets {
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
}

/// One tenant's budgets in this process.
#[derive(Debug, Default)]
pub(crate) struct TenantState {
    buckets: Mutex<Buckets>,
    inflight: AtomicU32,
}

fn bucket(slot: &mut Option<Bucket>, cap: u64, now_ms: u64) -> &mut Bucket {
    slot.get_or_insert_with(|| Bucket::full(cap, now_ms))
}

impl TenantState {
    /// Admit a request of `cost` prompt tokens if both buckets hold enough, taking them.
    pub fn admit(&self, l: &TenantLimits, cost: u64, now_ms: u64) -> Levels {
        let mut b = self.buckets.lock().expect("limits lock");
        let r = l
            .requests_per_minute
            .map(|cap| bucket(&mut b.requests, cap, now_ms).level(cap, now_ms));
        let k = l
            .tokens_per_minute
            .map(|cap| bucket(&mut b.tokens, cap, now_ms).level(cap, now_ms));
        let admitted = r.is_none_or(|r| r >= 1.0) && k.is_none_or(|k| k >= cost as f64);
        if !admitted {
            return Levels {
                admitted,
                requests: r,
                tokens: k,
            };
        }
        drop(b);
        self.take(l, cost, now_ms)
    }

    /// Take one request and `cost` tokens whatever the levels (the Redis backend admitted it:
    /// this process's buckets follow, for when it must decide alone).
    pub fn take(&self, l: &TenantLimits, cost: u64, now_ms: u64) -> Levels {
        let mut b = self.buckets.lock().expect("limits lock");
        let requests = l.requests_per_minute.map(|cap| {
            let r = bucket(&mut b.requests, cap, now_ms);
            r.take(cap, now_ms, 1.0);
            r.level(cap, now_ms)
        });
        let tokens = l.tokens_per_minute.map(|cap| {
            let t = bucket(&mut b.tokens, cap, now_ms);
            t.take(cap, now_ms, cost as f64);
            t.level(cap, now_ms)
        });
        Levels {
            admitted: true,
            requests,
            tokens,
        }
    }

    /// Take `n` more tokens (output as it streams; a negative `n` settles an overcount).
    pub fn charge(&self, tpm: u64, n: i64, now_ms: u64) {
        let mut b = self.buckets.lock().expect("limits lock");
        bucket(&mut b.tokens, tpm, now_ms).take(tpm, now_ms, n as f64);
    }

    /// Count one more request in flight if fewer than `max` are.
    pub fn enter(&self, max: u32) -> bool {
        self.inflight
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
    }

    pub fn leave(&self) {
        self.inflight.fetch_sub(1, Ordering::SeqCst);
    }

    #[cfg(test)]
    pub fn inflight(&self) -> u32 {
        self.inflight.load(Ordering::SeqCst)
    }
}

/// Every tenant's state, by name. A tenant keeps its state across key-file reloads (its limits
/// are read from the tenant at each check), so rotating a key does not refill its budget.
#[derive(Debug, Default)]
pub(crate) struct Local {
    tenants: Mutex<HashMap<String, Arc<TenantState>>>,
}

/// Past this many tenant states, those not in use are dropped (tenants removed from the key
/// file leave theirs behind); a dropped state comes back full.
const MAX_IDLE_STATES: usize = 10_000;

impl Local {
    pub fn state(&self, tenant: &str) -> Arc<TenantState> {
        let mut m = self.tenants.lock().expect("limits lock");
        if let Some(s) = m.get(tenant) {
            return s.clone();
        }
        if m.len() >= MAX_IDLE_STATES {
            m.retain(|_, s| Arc::strong_count(s) > 1);
        }
        m.entry(tenant.to_string()).or_default().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(rpm: Option<u64>, tpm: Option<u64>) -> TenantLimits {
        TenantLimits {
            requests_per_minute: rpm,
            tokens_per_minute: tpm,
            max_concurrent_requests: None,
        }
    }

    #[test]
    fn a_bucket_refills_a_minutes_budget_per_minute_and_never_past_full() {
        let mut b = Bucket::full(60, 0);
        b.take(60, 0, 60.0);
        assert_eq!(b.level(60, 0), 0.0);
        assert_eq!(b.level(60, 1_000), 1.0);
        assert_eq!(b.level(60, 30_000), 30.0);
        assert_eq!(b.level(60, 600_000), 60.0);
        b.take(60, 1_000, 5.0);
        assert_eq!(b.level(60, 1_000), -4.0);
        b.take(60, 1_000, -100.0);
        assert_eq!(b.level(60, 1_000), 60.0);
        assert_eq!(ms_until(-4.0, 1.0, 60), 5_000);
        assert_eq!(ms_until(2.0, 1.0, 60), 0);
    }

    #[test]
    fn requests_are_admitted_up_to_the_budget_then_as_it_refills() {
        let s = TenantState::default();
        let l = limits(Some(3), None);
        let admitted: Vec<bool> = (0..5).map(|_| s.admit(&l, 0, 0).admitted).collect();
        assert_eq!(admitted, [true, true, true, false, false]);
        // One request's worth refills in 20 s.
        assert!(!s.admit(&l, 0, 19_999).admitted);
        assert!(s.admit(&l, 0, 20_000).admitted);
        assert!(!s.admit(&l, 0, 20_000).admitted);
    }

    #[test]
    fn tokens_need_the_prompt_in_the_bucket_and_output_may_overdraw_it() {
        let s = TenantState::default();
        let l = limits(Some(100), Some(1_000));
        let lv = s.admit(&l, 600, 0);
        assert_eq!((lv.admitted, lv.tokens), (true, Some(400.0)));
        assert_eq!(lv.requests, Some(99.0));
        // A refused request takes nothing.
        let lv = s.admit(&l, 600, 0);
        assert_eq!(
            (lv.admitted, lv.tokens, lv.requests),
            (false, Some(400.0), Some(99.0))
        );
        s.charge(1_000, 500, 0);
        assert!(!s.admit(&l, 1, 0).admitted);
        // From -100 at 1,000 a minute: 1 token after 6.06 s.
        assert!(!s.admit(&l, 1, 6_059).admitted);
        assert!(s.admit(&l, 1, 6_060).admitted);
        // Settling an overcount gives tokens back.
        s.charge(1_000, -500, 6_060);
        assert!(s.admit(&l, 400, 6_060).admitted);
    }

    #[test]
    fn concurrency_is_bounded() {
        let s = TenantState::default();
        assert!(s.enter(2));
        assert!(s.enter(2));
        assert!(!s.enter(2));
        s.leave();
        assert!(s.enter(2));
        assert_eq!(s.inflight(), 2);
    }

    #[test]
    fn states_persist_per_tenant_and_idle_ones_are_pruned_past_the_bound() {
        let local = Local::default();
        let a = local.state("a");
        assert!(Arc::ptr_eq(&a, &local.state("a")));
        for i in 0..MAX_IDLE_STATES {
            local.state(&format!("t{i}"));
        }
        let n = local.tenants.lock().unwrap().len();
        assert!(n <= MAX_IDLE_STATES, "{n}");
        // The one held stays.
        assert!(Arc::ptr_eq(&a, &local.state("a")));
    }
}
