//! A prefill engine's measured throughput, the arithmetic only: work completed per second the
//! engine was busy with Tandem's legs (at least one in flight), both sums decayed with a time
//! constant of [`DECAY_SECS`]. Busy time, not leg duration, is the denominator: with several
//! legs in flight a leg's duration includes the others' work, so dividing by it would count the
//! same second many times.
//!
//! Time is an argument (seconds on the caller's clock), so the coordinator (`tandem-proxy`'s
//! `rate.rs`, real time) and the fleet simulator (`tandem-fleet`, virtual time) share it.

/// Decay time constant of the work and busy-time sums.
pub const DECAY_SECS: f64 = 30.0;
/// Busy time needed before the estimate is used (the first legs of a cold engine say little).
pub const MIN_BUSY_SECS: f64 = 0.25;

/// See the module docs.
#[derive(Debug, Default, Clone, Copy)]
pub struct RateEstimate {
    /// Decayed tokens of prefill work completed.
    work: f64,
    /// Decayed seconds with at least one leg in flight.
    busy: f64,
    active: u32,
    /// Time of the last event.
    last: Option<f64>,
}

impl RateEstimate {
    /// Decay the sums to `now`, counting the busy time since the last event.
    pub fn advance(&mut self, now: f64) {
        if let Some(last) = self.last {
            let dt = (now - last).max(0.0);
            let decay = (-dt / DECAY_SECS).exp();
            self.work *= decay;
            self.busy *= decay;
            if self.active > 0 {
                self.busy += dt;
            }
        }
        self.last = Some(self.last.map_or(now, |l| l.max(now)));
    }

    /// A prefill leg starts at `now`.
    pub fn begin(&mut self, now: f64) {
        self.advance(now);
        self.active += 1;
    }

    /// A prefill leg that began ends at `now`, having computed `work_tokens` (0 if it failed).
    pub fn end(&mut self, now: f64, work_tokens: u64) {
        self.advance(now);
        self.active = self.active.saturating_sub(1);
        self.work += work_tokens as f64;
    }

    /// Tokens per second, once the engine has been busy long enough to say.
    pub fn estimate(&self) -> Option<f64> {
        (self.busy >= MIN_BUSY_SECS && self.work > 0.0).then(|| self.work / self.busy)
    }
}
