//! The live P:D recommendation: from the work each pool is actually doing, the prefill:decode
//! ratio that would load both sides alike (`tandem_pd_ratio{kind="recommended"}`, and the
//! reasoning at `/admin/plan`).
//!
//! Each side's load is counted in engines' worth of work, from what every pool view already
//! holds (no extra scrape, nothing on the request path):
//! - a prefill engine counts 1 while it runs at least one prefill leg, or more when the prefill
//!   work routed to it and not finished (uncached tokens, over its measured tokens/s) exceeds
//!   [`BACKLOG_HORIZON_S`]: a queue that long means one engine is not enough;
//! - a decode engine batches: each stream it holds is a [`DECODE_MAX_SEQS`]th of an engine, and
//!   a KV cache (scraped usage plus Tandem's reservations) at [`KV_TARGET`] is a whole engine;
//!   it counts the larger of the two, since decode runs out of either memory or batch slots.
//!
//! Busy time is what prefill capacity is made of (a prefill step is compute-bound), but not
//! decode's: an engine streaming one request is busy and nearly empty. Prefill's measure
//! overstates prompts much shorter than a step's token budget; the reasoning names both so an
//! operator can tell.
//!
//! Both loads are smoothed over [`WINDOW_SECS`] (time-weighted, so irregular views count by how
//! long they held) and the recommendation is their ratio. An idle pair of pools decays both
//! loads alike, so the ratio keeps what the last work said.
//!
//! Pure: time is an argument (seconds on the caller's clock); `metrics.rs` feeds it each pool
//! view it observes.

use serde::Serialize;

/// Time constant of the smoothing, seconds: long enough to ride out one burst, short enough
/// that a shift in the workload shows within a minute.
pub const WINDOW_SECS: f64 = 10.0;
/// KV use at which a decode engine counts as one engine of work.
pub const KV_TARGET: f64 = 0.8;
/// Streams at which a decode engine counts as one engine of work: vLLM's default
/// `max_num_seqs`, the batch its scheduler stops growing at.
pub const DECODE_MAX_SEQS: f64 = 256.0;
/// Seconds of queued prefill work above which a prefill engine counts as more than one.
pub const BACKLOG_HORIZON_S: f64 = 1.0;
/// Below this much work on both sides together (engines' worth) nothing is recommended yet.
pub const MIN_LOAD: f64 = 0.05;
/// The recommended ratio stays within [1/MAX_RATIO, MAX_RATIO] (one side idle is not "∞").
pub const MAX_RATIO: f64 = 64.0;

/// One engine as one pool view shows it.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct EngineSample {
    pub healthy: bool,
    /// Legs in flight on it.
    pub inflight: u32,
    /// Prefill work routed to it and not finished, uncached tokens (prefill engines).
    pub queued_prefill_tokens: u64,
    /// Its measured prefill throughput, tokens/s busy (prefill engines, once measured).
    pub prefill_tokens_per_sec: Option<f64>,
    /// KV cache in use, reservations included, as a fraction (when scraped).
    pub kv_used: Option<f64>,
}

impl EngineSample {
    /// What a pool view shows of one engine: the control loop's health and KV scrape, the
    /// request path's counters as they are now.
    pub(crate) fn of(e: &crate::pool::EngineEntry) -> Self {
        let s = &e.status;
        let kv_used = s.num_gpu_blocks.filter(|&t| t > 0).and_then(|t| {
            let used = s.kv_used_blocks()? + e.engine.reserved_blocks();
            Some((used as f64 / t as f64).min(1.0))
        });
        EngineSample {
            healthy: s.health == tandem_policy::Health::Healthy,
            inflight: e.engine.inflight(),
            queued_prefill_tokens: e.engine.queued_prefill_tokens(),
            prefill_tokens_per_sec: e.engine.rate.tokens_per_sec(),
            kv_used,
        }
    }
}

/// One side's work at one instant, or smoothed over the window.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct SideLoad {
    /// Healthy engines.
    pub engines: f64,
    /// Engines running at least one leg.
    pub busy: f64,
    /// Engines' worth of work (see the module docs): what the ratio is made of.
    pub load: f64,
    /// Legs in flight, summed over the side.
    pub inflight: f64,
    /// Prefill only: seconds of routed, unfinished prefill work, summed over the engines.
    pub backlog_s: f64,
    /// Prefill only: tokens/s the busy engines compute (their measured rates, summed).
    pub prefill_tokens_per_s: f64,
    /// Mean KV use over the engines that report it.
    pub kv_used: f64,
}

impl SideLoad {
    fn prefill(engines: &[EngineSample]) -> Self {
        let mut s = SideLoad::default();
        for e in engines.iter().filter(|e| e.healthy) {
            s.engines += 1.0;
            let busy = e.inflight > 0;
            let rate = e
                .prefill_tokens_per_sec
                .filter(|r| r.is_finite() && *r > 0.0);
            let backlog = rate.map_or(0.0, |r| e.queued_prefill_tokens as f64 / r);
            s.busy += f64::from(u8::from(busy));
            s.inflight += f64::from(e.inflight);
            s.backlog_s += backlog;
            if busy {
                s.prefill_tokens_per_s += rate.unwrap_or(0.0);
            }
            let floor = f64::from(u8::from(busy));
            s.load += floor.max(backlog / BACKLOG_HORIZON_S);
            s.kv_used += e.kv_used.unwrap_or(0.0);
        }
        if s.engines > 0.0 {
            s.kv_used /= s.engines;
        }
        s
    }

    fn decode(engines: &[EngineSample]) -> Self {
        let mut s = SideLoad::default();
        let mut kv_n = 0.0;
        for e in engines.iter().filter(|e| e.healthy) {
            s.engines += 1.0;
            let busy = e.inflight > 0;
            s.busy += f64::from(u8::from(busy));
            s.inflight += f64::from(e.inflight);
            let kv = e.kv_used.map(|k| k.clamp(0.0, 1.0));
            if let Some(k) = kv {
                s.kv_used += k;
                kv_n += 1.0;
            }
            let seqs = f64::from(e.inflight) / DECODE_MAX_SEQS;
            s.load += seqs.max(kv.unwrap_or(0.0) / KV_TARGET);
        }
        if kv_n > 0.0 {
            s.kv_used /= kv_n;
        }
        s
    }

    /// Move every field a fraction `a` of the way to `x`.
    fn blend(&mut self, x: &SideLoad, a: f64) {
        let f = |s: &mut f64, x: f64| *s += a * (x - *s);
        f(&mut self.engines, x.engines);
        f(&mut self.busy, x.busy);
        f(&mut self.load, x.load);
        f(&mut self.inflight, x.inflight);
        f(&mut self.backlog_s, x.backlog_s);
        f(&mut self.prefill_tokens_per_s, x.prefill_tokens_per_s);
        f(&mut self.kv_used, x.kv_used);
    }
}

/// What the smoothed loads call for.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Recommendation {
    /// Prefill engines per decode engine: prefill load over decode load.
    pub ratio: f64,
    /// The ratio as a split of the healthy engines there are now (at least one each side).
    pub prefill: usize,
    pub decode: usize,
    pub prefill_side: SideLoad,
    pub decode_side: SideLoad,
    /// One sentence for an operator.
    pub reason: String,
}

/// The smoothed loads; one per coordinator.
#[derive(Debug, Default, Clone)]
pub struct Tracker {
    last: Option<f64>,
    prefill: SideLoad,
    decode: SideLoad,
    /// The current view's engines (not smoothed: a split is of the engines there are).
    engines: (usize, usize),
    current: Option<Recommendation>,
}

impl Tracker {
    /// Count one pool view seen at `now` (seconds); returns the recommendation, if any.
    pub fn observe(
        &mut self,
        now: f64,
        prefill: &[EngineSample],
        decode: &[EngineSample],
    ) -> Option<&Recommendation> {
        let (p, d) = (SideLoad::prefill(prefill), SideLoad::decode(decode));
        match self.last {
            None => (self.prefill, self.decode) = (p, d),
            Some(last) => {
                let a = 1.0 - (-(now - last).max(0.0) / WINDOW_SECS).exp();
                self.prefill.blend(&p, a);
                self.decode.blend(&d, a);
            }
        }
        self.last = Some(self.last.map_or(now, |l| l.max(now)));
        self.engines = (p.engines as usize, d.engines as usize);
        if let Some(r) = recommend(&self.prefill, &self.decode, self.engines) {
            self.current = Some(r);
        }
        self.current.as_ref()
    }

    /// The last recommendation (kept through idle spells).
    pub fn current(&self) -> Option<&Recommendation> {
        self.current.as_ref()
    }

    /// The smoothed loads now, for `/admin/plan` before there is a recommendation.
    pub fn sides(&self) -> (SideLoad, SideLoad) {
        (self.prefill, self.decode)
    }
}

/// The ratio and split two side loads call for; `None` while there is too little work to say,
/// or no engine on a side.
pub fn recommend(p: &SideLoad, d: &SideLoad, (np, nd): (usize, usize)) -> Option<Recommendation> {
    if np == 0 || nd == 0 || p.load + d.load < MIN_LOAD {
        return None;
    }
    // A side doing nothing still needs an engine: the floor keeps the ratio finite.
    let floor = MIN_LOAD / 2.0;
    let ratio = (p.load.max(floor) / d.load.max(floor)).clamp(1.0 / MAX_RATIO, MAX_RATIO);
    let n = np + nd;
    let prefill = if n < 2 {
        1
    } else {
        ((n as f64 * ratio / (1.0 + ratio)).round() as usize).clamp(1, n - 1)
    };
    let decode = n.saturating_sub(prefill).max(1);
    let lean = if prefill > np {
        "move engines to prefill"
    } else if prefill < np {
        "move engines to decode"
    } else {
        "keep the split"
    };
    let reason = format!(
        "prefill is doing {:.3} engines of work (busy {:.2} of {:.0}, {:.2} s of prefill queued), \
         decode {:.3} ({:.1} streams on {:.0}, KV {:.1} % used): {prefill}P+{decode}D of the {n} \
         healthy engines, {lean}",
        p.load,
        p.busy,
        p.engines,
        p.backlog_s,
        d.load,
        d.inflight,
        d.engines,
        d.kv_used * 100.0,
    );
    Some(Recommendation {
        ratio,
        prefill,
        decode,
        prefill_side: *p,
        decode_side: *d,
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefill_engine(inflight: u32, queued: u64) -> EngineSample {
        EngineSample {
            healthy: true,
            inflight,
            queued_prefill_tokens: queued,
            prefill_tokens_per_sec: Some(10_000.0),
            kv_used: Some(0.1),
        }
    }

    fn decode_engine(inflight: u32, kv: f64) -> EngineSample {
        EngineSample {
            healthy: true,
            inflight,
            kv_used: Some(kv),
            ..EngineSample::default()
        }
    }

    /// The same view held for `secs`, sampled every 100 ms.
    fn hold(t: &mut Tracker, from: f64, secs: f64, p: &[EngineSample], d: &[EngineSample]) -> f64 {
        let mut now = from;
        while now < from + secs {
            t.observe(now, p, d);
            now += 0.1;
        }
        now
    }

    #[test]
    fn prefill_heavy_work_recommends_more_prefill_engines() {
        // Long prompts, one output token: both prefill engines busy with 2.5 s of work queued
        // each; decode engines see short legs, one in four views (busy, yet nearly empty).
        let p = [prefill_engine(3, 25_000), prefill_engine(2, 25_000)];
        let d_busy = [decode_engine(1, 0.1), decode_engine(0, 0.0)];
        let d_idle = [decode_engine(0, 0.0), decode_engine(0, 0.0)];
        let mut t = Tracker::default();
        let mut now = 0.0;
        for i in 0..400 {
            let d = if i % 4 == 0 { &d_busy } else { &d_idle };
            t.observe(now, &p, d);
            now += 0.1;
        }
        let r = t.current().unwrap();
        assert!(r.ratio > 4.0, "{r:?}");
        assert_eq!((r.prefill, r.decode), (3, 1), "{}", r.reason);
        assert!(r.reason.contains("move engines to prefill"), "{}", r.reason);
        assert!((r.prefill_side.backlog_s - 5.0).abs() < 1e-6);
    }

    #[test]
    fn decode_heavy_work_recommends_more_decode_engines() {
        // Short prompts, long answers: prefill engines busy one view in ten, decode engines
        // stream all the time with their KV caches filling.
        let p_busy = [prefill_engine(1, 50), prefill_engine(0, 0)];
        let p_idle = [prefill_engine(0, 0), prefill_engine(0, 0)];
        let d = [decode_engine(40, 0.9), decode_engine(35, 0.85)];
        let mut t = Tracker::default();
        let mut now = 0.0;
        for i in 0..400 {
            let p = if i % 10 == 0 { &p_busy } else { &p_idle };
            t.observe(now, p, &d);
            now += 0.1;
        }
        let r = t.current().unwrap();
        assert!(r.ratio < 0.25, "{r:?}");
        assert_eq!((r.prefill, r.decode), (1, 3), "{}", r.reason);
        assert!(r.reason.contains("move engines to decode"), "{}", r.reason);
    }

    #[test]
    fn a_workload_shift_moves_the_ratio_within_the_window() {
        let p_heavy = [prefill_engine(2, 30_000)];
        let d_light = [decode_engine(0, 0.0)];
        let p_light = [prefill_engine(0, 0)];
        let d_heavy = [decode_engine(30, 0.5)];
        let mut t = Tracker::default();
        let now = hold(&mut t, 0.0, 30.0, &p_heavy, &d_light);
        let before = t.current().unwrap().ratio;
        let mut after = Vec::new();
        let mut at = now;
        for _ in 0..4 {
            at = hold(&mut t, at, WINDOW_SECS, &p_light, &d_heavy);
            after.push(t.current().unwrap().ratio);
        }
        assert!(before > 1.0, "{before}");
        assert!(after.windows(2).all(|w| w[1] < w[0]), "{after:?}");
        assert!(*after.last().unwrap() < 1.0, "{after:?}");
    }

    #[test]
    fn balanced_work_keeps_the_split_and_idle_keeps_the_last_answer() {
        // Prefill engines always busy; decode engines with their KV at the target.
        let p = [prefill_engine(1, 100), prefill_engine(1, 100)];
        let d = [decode_engine(100, KV_TARGET), decode_engine(90, KV_TARGET)];
        let mut t = Tracker::default();
        let now = hold(&mut t, 0.0, 20.0, &p, &d);
        let r = t.current().unwrap().clone();
        assert!((r.ratio - 1.0).abs() < 1e-9, "{r:?}");
        assert_eq!((r.prefill, r.decode), (2, 2));
        assert!(r.reason.contains("keep the split"));
        // Idle for a long while: both loads decay alike and the answer stays.
        let idle_p = [prefill_engine(0, 0), prefill_engine(0, 0)];
        let idle_d = [decode_engine(0, 0.0), decode_engine(0, 0.0)];
        hold(&mut t, now, 120.0, &idle_p, &idle_d);
        assert_eq!(t.current().unwrap().ratio, r.ratio);
        assert!(t.sides().0.load < MIN_LOAD);
    }

    #[test]
    fn a_decode_engine_is_full_at_max_num_seqs_or_at_the_kv_target() {
        let mut t = Tracker::default();
        let p = [prefill_engine(1, 0)];
        t.observe(0.0, &p, &[decode_engine(128, 0.1)]);
        assert!((t.sides().1.load - 0.5).abs() < 1e-9);
        assert_eq!(t.sides().1.busy, 1.0);
        let mut t = Tracker::default();
        t.observe(0.0, &p, &[decode_engine(1, 0.4)]);
        assert!((t.sides().1.load - 0.5).abs() < 1e-9);
    }

    #[test]
    fn nothing_is_recommended_without_work_or_without_engines() {
        let idle = SideLoad {
            engines: 2.0,
            ..SideLoad::default()
        };
        assert_eq!(recommend(&idle, &idle, (2, 2)), None);
        let busy = SideLoad { load: 1.0, ..idle };
        assert_eq!(recommend(&busy, &busy, (0, 2)), None);
        // Unhealthy engines count for nothing.
        let mut t = Tracker::default();
        let down = EngineSample {
            healthy: false,
            inflight: 9,
            ..EngineSample::default()
        };
        assert!(t.observe(0.0, &[down], &[down]).is_none());
        // One side idle: the ratio is bounded, and each side keeps an engine.
        let r = recommend(&busy, &idle, (3, 3)).unwrap();
        assert_eq!(r.ratio, 1.0 / (MIN_LOAD / 2.0));
        assert_eq!((r.prefill, r.decode), (5, 1));
    }

    #[test]
    fn smoothing_weighs_views_by_how_long_they_held() {
        let busy = [prefill_engine(1, 0)];
        let idle = [prefill_engine(0, 0)];
        let d = [decode_engine(1, 0.0)];
        let mut t = Tracker::default();
        t.observe(0.0, &idle, &d);
        // One view a whole window later moves the average by 1 − 1/e, however many came before.
        t.observe(WINDOW_SECS, &busy, &d);
        let a = t.sides().0.busy;
        assert!((a - (1.0 - (-1.0f64).exp())).abs() < 1e-9, "{a}");
        // A view at the same instant moves nothing; a clock that went back counts as no time.
        t.observe(WINDOW_SECS, &idle, &d);
        t.observe(WINDOW_SECS - 5.0, &idle, &d);
        assert_eq!(t.sides().0.busy, a);
    }
}
