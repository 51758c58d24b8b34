//! Each prefill engine's measured prefill throughput, for the `prefix` policy's time estimates.
//!
//! Tandem sees every prefill leg it sends: when it starts, when it ends, and how much of the
//! prompt the engine had to compute (the prompt less the cached tokens the engine reports, host
//! tier included; the caller adds the policy's per-request cost). The estimate is the work completed per second the engine was busy with
//! Tandem's legs (at least one in flight), both decayed with a time constant of
//! [`tandem_policy::DECAY_SECS`], so a slow GPU, a busy host-memory link or a noisy neighbour shows within
//! seconds and is forgotten as fast once it passes. Busy time, not leg duration, is the
//! denominator: with several legs in flight a leg's duration includes the others' work, so
//! dividing by it would count the same second many times.
//!
//! Time is an argument (seconds on the caller's monotonic clock), so the arithmetic is pure.
//!
//! The estimate is published at each leg's start and end into an atomic, which is what
//! snapshots, `/metrics` and `/admin/engines` read: a routing decision, which builds a snapshot
//! of every engine, takes no lock and does no arithmetic for it. Between two events the work and
//! busy sums decay by the same factor, so the ratio moves only by the busy time of legs still
//! running, which the next event counts.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use tandem_policy::RateEstimate as State;

/// See the module docs.
#[derive(Debug)]
pub struct PrefillRate {
    state: Mutex<State>,
    /// The estimate at the last event, as `f64` bits; NaN while there is none.
    published: AtomicU64,
}

impl Default for PrefillRate {
    fn default() -> Self {
        PrefillRate {
            state: Mutex::new(State::default()),
            published: AtomicU64::new(f64::NAN.to_bits()),
        }
    }
}

impl PrefillRate {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Every update leaves the numbers consistent, so a panicked holder changes nothing.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn publish(&self, s: &State) {
        let v = s.estimate().unwrap_or(f64::NAN);
        self.published.store(v.to_bits(), Ordering::Relaxed);
    }

    /// A prefill leg starts at `now`.
    pub fn begin(&self, now: f64) {
        let mut s = self.lock();
        s.begin(now);
        self.publish(&s);
    }

    /// A prefill leg that began ends at `now`, having computed `work_tokens` (0 if it failed).
    pub fn end(&self, now: f64, work_tokens: u64) {
        let mut s = self.lock();
        s.end(now, work_tokens);
        self.publish(&s);
    }

    /// Tokens per second as of the last leg event, once the engine has been busy long enough to
    /// say (module docs).
    pub fn tokens_per_sec(&self) -> Option<f64> {
        let v = f64::from_bits(self.published.load(Ordering::Relaxed));
        (!v.is_nan()).then_some(v)
    }

    /// The estimate decayed to `now` (what the next event would publish if no leg were running).
    #[cfg(test)]
    fn tokens_per_sec_at(&self, now: f64) -> Option<f64> {
        let mut s = *self.lock();
        s.advance(now);
        s.estimate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_time_not_leg_time_is_the_denominator() {
        let r = PrefillRate::default();
        assert_eq!(r.tokens_per_sec_at(0.0), None, "nothing measured");
        assert_eq!(r.tokens_per_sec(), None, "nothing published");
        // Four legs of 1,000 tokens in flight together for one second: 4,000 tok/s, not 1,000.
        for _ in 0..4 {
            r.begin(0.0);
        }
        for _ in 0..4 {
            r.end(1.0, 1000);
        }
        let rate = r.tokens_per_sec_at(1.0).unwrap();
        assert!((rate - 4000.0).abs() < 1.0, "{rate}");
        // What readers see is the estimate at that last event.
        assert_eq!(r.tokens_per_sec(), Some(rate));
        // Idle time does not count: an hour later the ratio is the same, only decayed.
        let later = r.tokens_per_sec_at(3600.0);
        assert!(
            later.is_none(),
            "decayed below the busy threshold: {later:?}"
        );
    }

    #[test]
    fn a_slowdown_shows_within_the_decay_time() {
        let r = PrefillRate::default();
        let mut t = 0.0;
        // 60 s at 10,000 tok/s, one leg after another...
        for _ in 0..60 {
            r.begin(t);
            t += 1.0;
            r.end(t, 10_000);
        }
        // ...then 60 s at 2,500 tok/s (e.g. host-tier loads on its link).
        for _ in 0..60 {
            r.begin(t);
            t += 1.0;
            r.end(t, 2_500);
        }
        let rate = r.tokens_per_sec_at(t).unwrap();
        assert!(rate < 4_000.0 && rate > 2_500.0, "{rate}");
    }

    #[test]
    fn failed_legs_add_busy_time_but_no_work() {
        let r = PrefillRate::default();
        r.begin(0.0);
        r.end(1.0, 1000);
        r.begin(1.0);
        r.end(2.0, 0);
        let rate = r.tokens_per_sec_at(2.0).unwrap();
        assert!(rate < 600.0 && rate > 400.0, "{rate}");
    }
}
