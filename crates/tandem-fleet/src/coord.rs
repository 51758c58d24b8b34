//! The coordinator as the routing core sees it: the pool snapshot it keeps (in flight, queued
//! prefill tokens, measured prefill rates, scraped KV usage, reservations), the two prefix
//! indexes, and the calls into [`tandem_policy::plan`] / [`tandem_policy::plan_decode`] the
//! proxy makes (`tandem-proxy/src/route.rs`), with the same admission checks.
//!
//! The proxy's bookkeeping lives in its (IO-bound) crate, so the few rules that feed the
//! snapshot are restated here, each naming the code it follows.

use std::collections::HashMap;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tandem_kvevents::{IndexOp, KeyTracker, KvEvent};
use tandem_policy::{
    plan, plan_decode, policy_for, DisaggDecision, EngineView, Plan, Policy, PoolSnapshot,
    RouteFacts, RouteRequest,
};
use tandem_radix::{EngineId, IndexConfig, PrefixIndex, PrefixMatch};

use crate::{EngineSpec, Feed, FleetConfig};

/// Seed of Tandem's key chain (`tandem-proxy/src/prefix.rs` `KEY_SEED`).
pub(crate) const KEY_SEED: u64 = 0;

/// The proxy's measured prefill rate: the same estimator (`tandem_policy::RateEstimate`), in
/// coordinator seconds.
type Rate = tandem_policy::RateEstimate;

/// One pool's prefix index and, for a precise feed, one key tracker per engine.
#[derive(Debug)]
struct Index {
    index: PrefixIndex,
    feed: Feed,
    scratch: PrefixMatch,
    trackers: Vec<KeyTracker>,
    block_size: u64,
}

impl Index {
    fn new(feed: Feed, engines: usize, block_size: u32, max_blocks: usize) -> Self {
        let ttl = match feed {
            Feed::Precise => None,
            Feed::Approximate { ttl_s } => Some((ttl_s * 1000.0) as u64),
        };
        Index {
            index: PrefixIndex::new(IndexConfig { max_blocks, ttl }),
            feed,
            scratch: PrefixMatch::new(),
            trackers: (0..engines)
                .map(|_| KeyTracker::new(block_size, KEY_SEED))
                .collect(),
            block_size: u64::from(block_size),
        }
    }

    fn lookup(&mut self, keys: &[u64], now_ms: u64) -> Vec<(usize, u64)> {
        if keys.is_empty() {
            return Vec::new();
        }
        if matches!(self.feed, Feed::Approximate { .. }) {
            self.index.expire(now_ms);
        }
        self.index.match_prefix(keys, &mut self.scratch);
        self.scratch
            .hits()
            .iter()
            .map(|&(e, b)| (usize::from(e.0), u64::from(b) * self.block_size))
            .collect()
    }

    fn routed(&mut self, engine: usize, keys: &[u64], now_ms: u64) {
        if matches!(self.feed, Feed::Approximate { .. }) && !keys.is_empty() {
            self.index.insert(EngineId(engine as u16), keys, now_ms);
        }
    }

    fn events(&mut self, engine: usize, events: &[KvEvent], now_ms: u64, ops: &mut Vec<IndexOp>) {
        if self.feed != Feed::Precise || events.is_empty() {
            return;
        }
        ops.clear();
        self.trackers[engine].apply_batch(events, ops);
        let id = EngineId(engine as u16);
        for op in ops.drain(..) {
            match op {
                IndexOp::Insert(k) => self.index.insert(id, &k, now_ms),
                IndexOp::Remove(k) => self.index.remove(id, &k),
                IndexOp::Clear => self.index.clear_engine(id),
            }
        }
    }
}

/// A decode engine's reservations (`tandem-proxy/src/pool.rs` `Reservation`): blocks promised
/// to a request until a scrape sent after the request began shows them.
#[derive(Debug, Default)]
struct Reservations {
    /// Request → (blocks still counted, scrape count when it began).
    open: HashMap<usize, (u64, Option<u64>)>,
    scrapes: u64,
}

/// Why a request waits in the admission queue instead of being placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Held {
    DecodeKv,
    PrefillQueue,
}

/// A request as the planner sees it.
#[derive(Debug, Clone)]
pub(crate) struct Routing {
    pub seq: u64,
    pub prompt_tokens: u64,
    pub keys: Vec<u64>,
    pub need_blocks: u64,
    pub prefill_cached: Vec<(usize, u64)>,
    pub decode_cached: Vec<(usize, u64)>,
}

#[derive(Debug)]
pub(crate) struct Coord {
    pub snap: PoolSnapshot,
    rates: Vec<Rate>,
    prefill_index: Index,
    decode_index: Index,
    prefill_policy: Box<dyn Policy>,
    decode_policy: Box<dyn Policy>,
    cfg: FleetConfig,
    rng: ChaCha8Rng,
    next_seq: u64,
    pending_decode_blocks: u64,
    resv: Vec<Reservations>,
    ops: Vec<IndexOp>,
}

fn views(pool: &[EngineSpec], prefix: &str, capacity: bool) -> Vec<EngineView> {
    pool.iter()
        .enumerate()
        .map(|(i, e)| EngineView {
            weight: e.weight,
            // A scrape before the first request tells the coordinator each engine's capacity.
            kv_total_blocks: capacity.then_some(u64::from(e.gpu_blocks())),
            kv_used_blocks: capacity.then_some(0),
            ..EngineView::healthy(i, format!("{prefix}{i}"))
        })
        .collect()
}

impl Coord {
    pub(crate) fn new(cfg: &FleetConfig) -> Self {
        let bs = cfg.decode.first().map_or(16, |e| e.block_size);
        // Room for every block the engines can report, both tiers, a quarter spare (as
        // `tandem bench trace` sizes it).
        let reach = |pool: &[EngineSpec]| -> usize {
            pool.iter()
                .map(|e| e.gpu_blocks().max(e.host_blocks()) as usize)
                .sum()
        };
        let max = |pool: &[EngineSpec]| {
            cfg.index_max_blocks
                .unwrap_or_else(|| (reach(pool) + reach(pool) / 4).max(1_000_000))
        };
        Coord {
            snap: PoolSnapshot {
                prefill: views(&cfg.prefill, "p", false),
                decode: views(&cfg.decode, "d", true),
            },
            rates: vec![Rate::default(); cfg.prefill.len()],
            prefill_index: Index::new(cfg.prefill_feed, cfg.prefill.len(), bs, max(&cfg.prefill)),
            decode_index: Index::new(cfg.decode_feed, cfg.decode.len(), bs, max(&cfg.decode)),
            prefill_policy: policy_for(cfg.prefill_policy),
            decode_policy: policy_for(cfg.decode_policy),
            rng: ChaCha8Rng::seed_from_u64(cfg.seed),
            cfg: cfg.clone(),
            next_seq: 0,
            pending_decode_blocks: 0,
            resv: (0..cfg.decode.len())
                .map(|_| Reservations::default())
                .collect(),
            ops: Vec::new(),
        }
    }

    /// Coordinator seconds at simulated time `t`.
    fn secs(&self, t: f64) -> f64 {
        t / self.cfg.coordinator_scale
    }

    fn ms(&self, t: f64) -> u64 {
        (self.secs(t) * 1000.0) as u64
    }

    /// The request's routing facts: keys, KV need (`route::blocks_needed`), index predictions.
    pub(crate) fn routing(&mut self, t: f64, prompt: &[u32], max_tokens: u64) -> Routing {
        let bs = self.prefill_index.block_size.max(1);
        let keys = tandem_radix::block_keys(prompt, bs as usize, KEY_SEED);
        let now = self.ms(t);
        let seq = self.next_seq;
        self.next_seq += 1;
        let prompt_tokens = prompt.len() as u64;
        let out = max_tokens.min(self.cfg.expected_output_tokens);
        Routing {
            seq,
            prompt_tokens,
            need_blocks: (prompt_tokens + out).div_ceil(bs),
            prefill_cached: self.prefill_index.lookup(&keys, now),
            decode_cached: self.decode_index.lookup(&keys, now),
            keys,
        }
    }

    fn decode_pool_has_room(&self, need: u64) -> bool {
        let mut free = 0u64;
        let mut largest = 0u64;
        for e in self.snap.decode.iter().filter(|e| e.routable()) {
            let (Some(f), Some(total)) = (e.kv_free_blocks(), e.kv_total_blocks) else {
                return true;
            };
            free += f;
            largest = largest.max(total);
        }
        need > largest || self.pending_decode_blocks + need <= free
    }

    /// `route::plan_admitted`: the plan, or why the request must wait. Takes the admission
    /// (a local request's decode load and reservation, a disaggregated one's pool-wide room).
    pub(crate) fn plan(&mut self, r: &Routing, req: usize) -> Result<Plan, Held> {
        let uncached = r
            .prompt_tokens
            .saturating_sub(r.decode_cached.iter().map(|&(_, t)| t).max().unwrap_or(0));
        let rr = RouteRequest {
            seq: r.seq,
            prompt_tokens: r.prompt_tokens,
            uncached_tokens: uncached,
            exclude_prefill: &[],
            exclude_decode: &[],
            force_local: None,
            prefill_cached: &r.prefill_cached,
            decode_cached: &r.decode_cached,
            kv_blocks_needed: r.need_blocks,
            session: None,
        };
        let run = |c: &mut Coord, rr: &RouteRequest<'_>| {
            plan(
                &c.snap,
                rr,
                &c.cfg.disagg,
                c.prefill_policy.as_ref(),
                c.decode_policy.as_ref(),
                &mut c.rng,
            )
        };
        let mut planned = run(self, &rr);
        let max = self.cfg.max_prefill_queue_tokens;
        if max > 0 {
            let full: Vec<usize> = self
                .snap
                .prefill
                .iter()
                .filter(|e| e.queued_prefill_tokens >= max)
                .map(|e| e.id)
                .collect();
            if let Ok(p) = &planned {
                if p.prefill.is_some_and(|pp| full.contains(&pp.id)) {
                    if full.len() == self.snap.prefill.len() {
                        return Err(Held::PrefillQueue);
                    }
                    planned = run(
                        self,
                        &RouteRequest {
                            exclude_prefill: &full,
                            ..rr
                        },
                    );
                }
            }
        }
        let plan = match planned {
            Ok(p) => p,
            Err(e) if e.is_capacity() => return Err(Held::DecodeKv),
            // No engine at all: the fleet's construction rules it out; wait rather than drop.
            Err(_) => return Err(Held::DecodeKv),
        };
        if self.decode_policy.capacity_aware() && !self.decode_pool_has_room(r.need_blocks) {
            return Err(Held::DecodeKv);
        }
        match plan.decision {
            DisaggDecision::Local => self.admit_on(plan.decode.id, req, r.need_blocks),
            DisaggDecision::Disaggregate => self.pending_decode_blocks += r.need_blocks,
        }
        Ok(plan)
    }

    /// `route::admit_decode`: the decode engine at the handoff, taking the admission there.
    pub(crate) fn handoff(&mut self, r: &Routing, req: usize, prefill: usize) -> Option<usize> {
        let facts = RouteFacts {
            seq: r.seq,
            prompt_tokens: r.prompt_tokens,
            cached: &r.decode_cached,
            kv_blocks_needed: r.need_blocks,
            session: None,
        };
        let pick = plan_decode(
            &self.snap,
            facts,
            &[],
            Some(prefill),
            self.decode_policy.as_ref(),
            &mut self.rng,
        )
        .ok()?;
        self.pending_decode_blocks = self.pending_decode_blocks.saturating_sub(r.need_blocks);
        self.admit_on(pick.id, req, r.need_blocks);
        Some(pick.id)
    }

    fn admit_on(&mut self, d: usize, req: usize, blocks: u64) {
        let e = &mut self.snap.decode[d];
        e.inflight += 1;
        e.kv_reserved_blocks += blocks;
        self.resv[d].open.insert(req, (blocks, None));
    }

    /// The decode leg's first event reached the coordinator: the next scrape sees its blocks.
    pub(crate) fn decode_began(&mut self, d: usize, req: usize) {
        let n = self.resv[d].scrapes;
        if let Some((_, began)) = self.resv[d].open.get_mut(&req) {
            began.get_or_insert(n);
        }
    }

    /// The decode leg ended: its load and reservation go.
    pub(crate) fn decode_done(&mut self, d: usize, req: usize) {
        let e = &mut self.snap.decode[d];
        e.inflight = e.inflight.saturating_sub(1);
        if let Some((b, _)) = self.resv[d].open.remove(&req) {
            e.kv_reserved_blocks = e.kv_reserved_blocks.saturating_sub(b);
        }
    }

    /// A prefill leg is sent to `p` with `work` predicted uncached tokens (`prefill.rs`).
    pub(crate) fn prefill_sent(&mut self, t: f64, p: usize, work: u64, keys: &[u64]) {
        let now = self.secs(t);
        let ms = self.ms(t);
        self.prefill_index.routed(p, keys, ms);
        let e = &mut self.snap.prefill[p];
        e.inflight += 1;
        e.queued_prefill_tokens += work;
        let r = &mut self.rates[p];
        r.begin(now);
        e.prefill_tokens_per_sec = r.estimate();
    }

    /// The prefill leg answered, the engine having computed `computed` tokens.
    pub(crate) fn prefill_answered(&mut self, t: f64, p: usize, work: u64, computed: u64) {
        let now = self.secs(t);
        let e = &mut self.snap.prefill[p];
        e.inflight = e.inflight.saturating_sub(1);
        e.queued_prefill_tokens = e.queued_prefill_tokens.saturating_sub(work);
        let r = &mut self.rates[p];
        r.end(now, computed + self.cfg.request_cost_tokens);
        e.prefill_tokens_per_sec = r.estimate();
    }

    /// A request placed whole on decode engine `d`, or a handoff sent to it: the approximate
    /// feed learns its blocks.
    pub(crate) fn decode_routed(&mut self, t: f64, d: usize, keys: &[u64]) {
        let ms = self.ms(t);
        self.decode_index.routed(d, keys, ms);
    }

    /// KV events an engine published (precise feeds).
    pub(crate) fn kv_events(&mut self, t: f64, decode_pool: bool, e: usize, events: &[KvEvent]) {
        let ms = self.ms(t);
        let mut ops = std::mem::take(&mut self.ops);
        let index = if decode_pool {
            &mut self.decode_index
        } else {
            &mut self.prefill_index
        };
        index.events(e, events, ms, &mut ops);
        self.ops = ops;
    }

    /// Which pools need engine KV events.
    pub(crate) fn wants_events(&self, decode_pool: bool) -> bool {
        let feed = if decode_pool {
            self.cfg.decode_feed
        } else {
            self.cfg.prefill_feed
        };
        feed == Feed::Precise
    }

    /// A metrics scrape of decode engine `d` showing `used` blocks: reservations of requests
    /// begun before it stop counting (`Engine::scrape_published`).
    pub(crate) fn scraped(&mut self, d: usize, used: u64) {
        let r = &mut self.resv[d];
        r.scrapes += 1;
        let n = r.scrapes;
        let mut visible = 0;
        for (blocks, began) in r.open.values_mut() {
            if began.is_some_and(|b| b < n) && *blocks > 0 {
                visible += *blocks;
                *blocks = 0;
            }
        }
        let e = &mut self.snap.decode[d];
        e.kv_used_blocks = Some(used);
        e.kv_reserved_blocks = e.kv_reserved_blocks.saturating_sub(visible);
    }

    /// Simulated seconds between two scrapes.
    pub(crate) fn scrape_every(&self) -> f64 {
        self.cfg.scrape_interval_s * self.cfg.coordinator_scale
    }
}
