//! Routing one request: prefix-index lookups, the pure plan, KV reservations, and what it needs
//! room for before its prefill and at its handoff (it waits for that in `admission/`).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tandem_policy::{
    DisaggDecision, DisaggReason, Plan, PlanError, PoolKind, PoolSnapshot, RouteFacts, RouteReason,
    RouteRequest,
};

use tandem_config::DEFAULT_GROUP;

use crate::admission::{self, Held, Stage, Who};
use crate::error::ProxyError;
use crate::front::Parsed;
use crate::pool::{LoadGuard, Pools};
use crate::State;

/// What the prefix indexes predict for one request.
#[derive(Debug, Default)]
pub struct Prediction {
    pub keys: Vec<u64>,
    pub prefill: Vec<(usize, u64)>,
    pub decode: Vec<(usize, u64)>,
}

impl Prediction {
    pub fn cached_on(&self, pool: PoolKind, id: usize) -> u64 {
        let hits = match pool {
            PoolKind::Prefill => &self.prefill,
            PoolKind::Decode => &self.decode,
        };
        hits.iter().find(|(e, _)| *e == id).map_or(0, |&(_, t)| t)
    }
}

/// Both pools' indexes share the block size (`model.block_size`), so one key list serves both.
pub fn predict(st: &State, req: &Parsed) -> Prediction {
    let keys = st.prefill_index.keys(&req.prompt_ids);
    Prediction {
        prefill: st.prefill_index.lookup(&keys),
        decode: st.decode_index.lookup(&keys),
        keys,
    }
}

/// KV blocks the request will occupy on its decode engine: its prompt plus the output it is
/// expected to write (`max_tokens` when smaller than `routing.expected_output_tokens`).
pub fn blocks_needed(st: &State, req: &Parsed) -> u64 {
    let bs = u64::from(st.cfg.model.block_size).max(1);
    let out = req
        .max_tokens
        .unwrap_or(u64::MAX)
        .min(st.cfg.routing.expected_output_tokens);
    (req.prompt_tokens + out).div_ceil(bs)
}

/// One plan's inputs besides the request.
#[derive(Debug)]
pub struct Attempt<'a> {
    pub seq: u64,
    pub exclude_prefill: &'a [usize],
    pub exclude_decode: &'a [usize],
    pub force_local: Option<DisaggReason>,
    /// Whose request it is, for its place in the admission queue.
    pub who: &'a Who,
}

/// A plan with the pool table it was made from and, for a request that runs whole on its decode
/// engine, its admission there (counted in flight, with a KV reservation). A disaggregated
/// request's decode pick is provisional (it warms a connection during the prefill);
/// [`admit_decode`] decides again, from the state at the handoff, when the KV is ready to move,
/// since only then does the request need room and count as load there.
pub struct Routed<'s> {
    pub pools: Arc<Pools>,
    pub plan: Plan,
    pub admitted: Option<LoadGuard>,
    /// A disaggregated request's pool-wide decode room, held until its handoff is admitted.
    pub pending: Option<PendingDecode<'s>>,
}

/// Why no plan came back.
#[derive(Debug)]
pub enum RouteError {
    /// The planner found no engine (the caller words the error, knowing earlier failures).
    Plan(PlanError),
    /// Refused for capacity: 503 with Retry-After.
    Refused(ProxyError),
}

/// Decode KV blocks promised, pool-wide, to one request while its prefill runs: requests in
/// prefill hold no engine's KV (the engine is decided at the handoff), but the pool as a whole
/// must keep room for them, or a burst all admitted on the same scrape would prefill, pin its
/// KV on the prefill engines and then find no decode room. Released at the handoff, where the
/// request's own reservation on its decode engine replaces it, or when the request ends.
#[derive(Debug)]
pub struct PendingDecode<'a> {
    st: &'a State,
    blocks: u64,
}

impl<'a> PendingDecode<'a> {
    fn take(st: &'a State, blocks: u64) -> Self {
        st.pending_decode_blocks.fetch_add(blocks, Ordering::AcqRel);
        PendingDecode { st, blocks }
    }
}

impl Drop for PendingDecode<'_> {
    fn drop(&mut self) {
        self.st
            .pending_decode_blocks
            .fetch_sub(self.blocks, Ordering::AcqRel);
        self.st.pools.freed.notify_waiters();
    }
}

/// Whether the decode pool has room for `need` more blocks besides those promised to requests
/// in prefill. Unknown capacity, and a request larger than any engine (the policy sends it on
/// visibly), never hold a request here.
fn decode_pool_has_room(st: &State, snap: &PoolSnapshot, exclude: &[usize], need: u64) -> bool {
    let mut free = 0u64;
    let mut largest = 0u64;
    for e in snap
        .decode
        .iter()
        .filter(|e| e.routable() && !exclude.contains(&e.id))
    {
        let (Some(f), Some(total)) = (e.kv_free_blocks(), e.kv_total_blocks) else {
            return true;
        };
        free += f;
        largest = largest.max(total);
    }
    need > largest || st.pending_decode_blocks.load(Ordering::Acquire) + need <= free
}

/// The prefill engines with `admission.max_prefill_queue_tokens` queued (none when it is 0).
fn full_prefill_engines(st: &State, snap: &PoolSnapshot) -> Vec<usize> {
    let max = st.cfg.admission.max_prefill_queue_tokens;
    if max == 0 {
        return Vec::new();
    }
    snap.prefill
        .iter()
        .filter(|e| e.queued_prefill_tokens >= max)
        .map(|e| e.id)
        .collect()
}

/// Plan the request. A local request needs decode KV room now, so it may wait for it; a
/// disaggregated one needs a prefill engine with queue room now and decode room in the pool
/// (its decode engine is provisional: the one the policy would pick now, decided again at the
/// handoff), so a request that would find no decode room is held (or refused) before any
/// prefill work is spent on it.
pub async fn plan_admitted<'s>(
    st: &'s State,
    req: &Parsed,
    pred: &Prediction,
    a: &Attempt<'_>,
) -> Result<Routed<'s>, RouteError> {
    let need = blocks_needed(st, req);
    let uncached = req
        .prompt_tokens
        .saturating_sub(pred.decode.iter().map(|&(_, t)| t).max().unwrap_or(0));
    let rr = RouteRequest {
        seq: a.seq,
        prompt_tokens: req.prompt_tokens,
        uncached_tokens: uncached,
        exclude_prefill: a.exclude_prefill,
        exclude_decode: a.exclude_decode,
        force_local: a.force_local,
        prefill_cached: &pred.prefill,
        decode_cached: &pred.decode,
        kv_blocks_needed: need,
        session: req.session,
    };
    let (rx, freed) = (&st.pools.pools, &st.pools.freed);
    admission::wait_for_room(
        &st.admission,
        rx,
        freed,
        a.who,
        Stage::Arrival,
        need,
        |pools: &Arc<Pools>| {
            // Under the lock every decision holds, so the snapshot has every admission before it.
            let mut rng = st.rng.lock().expect("rng lock");
            // Only the request's engine group, in both pools: its P/D pair never crosses groups.
            let snap = pools.snapshot().in_group(&a.who.group, DEFAULT_GROUP);
            let mut plan_with = |rr: &RouteRequest<'_>| {
                tandem_policy::plan(
                    &snap,
                    rr,
                    &st.disagg,
                    st.prefill_policy.as_ref(),
                    st.decode_policy.as_ref(),
                    &mut *rng,
                )
            };
            let mut planned = plan_with(&rr);
            // A prefill engine at `admission.max_prefill_queue_tokens` takes no more: plan again
            // without the full ones while another can take it, else wait.
            let full = full_prefill_engines(st, &snap);
            if let Ok(p) = &planned {
                if p.prefill.is_some_and(|pp| full.contains(&pp.id)) {
                    let mut ex = a.exclude_prefill.to_vec();
                    ex.extend_from_slice(&full);
                    let open = snap
                        .prefill
                        .iter()
                        .any(|e| e.routable() && !ex.contains(&e.id));
                    if !open {
                        return Ok(Err(Held::PrefillQueue));
                    }
                    planned = plan_with(&RouteRequest {
                        exclude_prefill: &ex,
                        ..rr
                    });
                }
            }
            let plan = match planned {
                Ok(p) => p,
                Err(e) if e.is_capacity() => return Ok(Err(Held::DecodeKv)),
                Err(e) => return Err(e),
            };
            // Room promised to requests in prefill counts against every new admission, local ones
            // included, or a burst of local requests could take the room a handoff was promised.
            if st.decode_policy.capacity_aware()
                && !decode_pool_has_room(st, &snap, a.exclude_decode, need)
            {
                return Ok(Err(Held::DecodeKv));
            }
            let mut pending = None;
            let admitted = match plan.decision {
                DisaggDecision::Local => {
                    let engine = &pools
                        .find(PoolKind::Decode, plan.decode.id)
                        .expect("the plan came from this snapshot")
                        .engine;
                    Some(engine.track(0).with_reservation(engine.reserve(need)))
                }
                DisaggDecision::Disaggregate => {
                    pending = Some(PendingDecode::take(st, need));
                    None
                }
            };
            Ok(Ok(Routed {
                pools: pools.clone(),
                plan,
                admitted,
                pending,
            }))
        },
    )
    .await
}

/// One handoff's admission inputs besides the request.
#[derive(Debug, Clone, Copy)]
pub struct HandoffAt<'a> {
    pub seq: u64,
    /// Decode engines this request must not use.
    pub exclude: &'a [usize],
    /// The prefill engine holding the KV (`None`: a local request).
    pub prefill_id: Option<usize>,
    /// The provisional decode engine.
    pub current: usize,
    pub who: &'a Who,
}

/// The decode engine for a request whose KV is ready on prefill engine `prefill_id`: the
/// policy's pick from the state now (every handoff admitted before this one counted in flight
/// and in KV), else wait in the admission queue. The provisional engine chosen at arrival only
/// keeps the request if the policy picks it again: keeping it whenever it had room sent the
/// handoffs of one burst, all provisionally placed on the same stale scrape, to one engine.
/// Returns the engine's pool table, the policy's reason when it picked another engine (`None`:
/// `current` kept), the engine id and the admission (in flight, with a KV reservation), taken
/// under the same lock as the decision so the next decision sees it.
pub async fn admit_decode(
    st: &State,
    req: &Parsed,
    pred: &Prediction,
    h: &HandoffAt<'_>,
) -> Result<(Arc<Pools>, Option<RouteReason>, usize, LoadGuard), RouteError> {
    let HandoffAt {
        seq,
        exclude,
        prefill_id,
        current,
        who,
    } = *h;
    let need = blocks_needed(st, req);
    let facts = RouteFacts {
        seq,
        prompt_tokens: req.prompt_tokens,
        cached: &pred.decode,
        kv_blocks_needed: need,
        session: req.session,
    };
    let (rx, freed) = (&st.pools.pools, &st.pools.freed);
    admission::wait_for_room(
        &st.admission,
        rx,
        freed,
        who,
        Stage::Handoff,
        need,
        |pools: &Arc<Pools>| {
            // The snapshot is taken under the RNG lock, which every decision holds, so it includes
            // every admission decided before this one.
            let mut rng = st.rng.lock().expect("rng lock");
            let snap = pools.snapshot().in_group(&who.group, DEFAULT_GROUP);
            let p = match tandem_policy::plan_decode(
                &snap,
                facts,
                exclude,
                prefill_id,
                st.decode_policy.as_ref(),
                &mut *rng,
            ) {
                Ok(p) => p,
                Err(e) if e.is_capacity() => return Ok(Err(Held::DecodeKv)),
                Err(e) => return Err(e),
            };
            let reason = (p.id != current).then_some(p.reason);
            let engine = &pools
                .find(PoolKind::Decode, p.id)
                .expect("the pick came from this snapshot")
                .engine;
            let admitted = engine.track(0).with_reservation(engine.reserve(need));
            Ok(Ok((pools.clone(), reason, p.id, admitted)))
        },
    )
    .await
}
