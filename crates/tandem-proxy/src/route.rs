//! Routing one request: prefix-index lookups, the pure plan, KV reservations, and the admission
//! queue that holds requests no decode engine has room for.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tandem_policy::{DisaggReason, Plan, PlanError, PoolKind, RouteFacts, RouteRequest};
use tokio::time::Instant;

use crate::error::ProxyError;
use crate::front::Parsed;
use crate::pool::{Pools, Reservation};
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
}

/// A plan with the pool table it was made from and the decode engine's KV reservation.
pub struct Routed {
    pub pools: Arc<Pools>,
    pub plan: Plan,
    pub reservation: Reservation,
}

/// Why no plan came back.
#[derive(Debug)]
pub enum RouteError {
    /// The planner found no engine (the caller words the error, knowing earlier failures).
    Plan(PlanError),
    /// Refused for capacity: 503 with Retry-After.
    Refused(ProxyError),
}

/// Plan against the current snapshot; when no decode engine has KV room, wait in the admission
/// queue (bounded in length and time) for a release or a fresh scrape, then plan again.
pub async fn plan_admitted(
    st: &State,
    req: &Parsed,
    pred: &Prediction,
    a: &Attempt<'_>,
) -> Result<Routed, RouteError> {
    let need = blocks_needed(st, req);
    let mut rx = st.pools.pools.clone();
    let mut queued: Option<(QueueSlot<'_>, Instant)> = None;
    loop {
        // Registered before planning, so a release between the plan and the wait still wakes us.
        let freed = st.pools.freed.notified();
        tokio::pin!(freed);
        freed.as_mut().enable();
        let pools = rx.borrow_and_update().clone();
        let snap = pools.snapshot();
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
        };
        let planned = {
            let mut rng = st.rng.lock().expect("rng lock");
            tandem_policy::plan(
                &snap,
                &rr,
                &st.disagg,
                st.prefill_policy.as_ref(),
                st.decode_policy.as_ref(),
                &mut *rng,
            )
        };
        match planned {
            Ok(plan) => {
                let engine = &pools
                    .find(PoolKind::Decode, plan.decode.id)
                    .expect("the plan came from this snapshot")
                    .engine;
                let reservation = engine.reserve(need);
                return Ok(Routed {
                    reservation,
                    pools,
                    plan,
                });
            }
            Err(e) if e.is_capacity() => {}
            Err(e) => return Err(RouteError::Plan(e)),
        }
        let deadline = match &queued {
            Some((_, d)) => *d,
            None => {
                let slot = QueueSlot::take(st).ok_or_else(|| {
                    RouteError::Refused(overloaded(
                        st,
                        "no decode engine has KV room and the admission queue is full",
                    ))
                })?;
                let d =
                    Instant::now() + std::time::Duration::from_millis(st.cfg.admission.max_wait_ms);
                queued = Some((slot, d));
                d
            }
        };
        tokio::select! {
            _ = &mut freed => {}
            r = rx.changed() => if r.is_err() {
                return Err(RouteError::Plan(PlanError::NoDecodeEngine));
            },
            _ = tokio::time::sleep_until(deadline) => {
                return Err(RouteError::Refused(overloaded(
                    st,
                    "no decode engine had KV room within admission.max_wait_ms",
                )));
            }
        }
    }
}

/// Another decode engine for a request whose KV sits on prefill engine `prefill_id`.
pub fn replan_decode(
    st: &State,
    req: &Parsed,
    pred: &Prediction,
    seq: u64,
    exclude: &[usize],
    prefill_id: Option<usize>,
) -> Result<(Arc<Pools>, tandem_policy::Pick, Reservation), PlanError> {
    let need = blocks_needed(st, req);
    let pools = st.pools.pools.borrow().clone();
    let facts = RouteFacts {
        seq,
        prompt_tokens: req.prompt_tokens,
        cached: &pred.decode,
        kv_blocks_needed: need,
    };
    let pick = {
        let mut rng = st.rng.lock().expect("rng lock");
        tandem_policy::plan_decode(
            &pools.snapshot(),
            facts,
            exclude,
            prefill_id,
            st.decode_policy.as_ref(),
            &mut *rng,
        )?
    };
    let reservation = pools
        .find(PoolKind::Decode, pick.id)
        .expect("the pick came from this snapshot")
        .engine
        .reserve(need);
    Ok((pools, pick, reservation))
}

fn overloaded(st: &State, reason: &'static str) -> ProxyError {
    st.metrics.admission_rejected.inc();
    ProxyError::Overloaded {
        reason,
        retry_after: st.cfg.admission.retry_after_secs,
    }
}

/// A place in the admission queue; gives it back when dropped.
struct QueueSlot<'a> {
    st: &'a State,
}

impl<'a> QueueSlot<'a> {
    fn take(st: &'a State) -> Option<Self> {
        let max = st.cfg.admission.max_queued;
        st.admission_waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        st.metrics.admission_queued.inc();
        st.metrics
            .admission_waiting
            .set(i64::from(st.admission_waiting.load(Ordering::Acquire)));
        Some(QueueSlot { st })
    }
}

impl Drop for QueueSlot<'_> {
    fn drop(&mut self) {
        let n = self.st.admission_waiting.fetch_sub(1, Ordering::AcqRel) - 1;
        self.st.metrics.admission_waiting.set(i64::from(n));
    }
}
