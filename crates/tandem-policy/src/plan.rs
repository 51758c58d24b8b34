//! Planning one request: the disaggregation decision, then the prefill engine, then a decode
//! engine compatible with it.

use rand::RngCore;

use crate::disagg::{decide, DisaggDecision, DisaggReason, DisaggSettings};
use crate::policy::{Choice, Policy, RouteFacts, RouteReason};
use crate::snapshot::{EngineView, PoolSnapshot};

/// What the planner needs to know about a request.
#[derive(Debug, Clone, Copy)]
pub struct RouteRequest<'a> {
    pub seq: u64,
    pub prompt_tokens: u64,
    /// Prompt tokens the planner expects no prefill engine to have cached.
    pub uncached_tokens: u64,
    /// Engine ids already tried for this request (retries go elsewhere).
    pub exclude_prefill: &'a [usize],
    pub exclude_decode: &'a [usize],
    /// A local-prefill fallback already decided (e.g. null params); skips the prefill choice.
    pub force_local: Option<DisaggReason>,
    /// Predicted cached prompt tokens per prefill engine id (the prefill pool's prefix index).
    pub prefill_cached: &'a [(usize, u64)],
    /// The same for decode engines, which prefill locally when the request runs whole.
    pub decode_cached: &'a [(usize, u64)],
    /// KV blocks the request will occupy on its decode engine.
    pub kv_blocks_needed: u64,
    /// The client's hashed session key, if any (prefill affinity).
    pub session: Option<u64>,
}

/// One engine pick: the engine id and the policy's reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pick {
    pub id: usize,
    pub reason: RouteReason,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub decision: DisaggDecision,
    pub decision_reason: DisaggReason,
    /// Set exactly when `decision` is `Disaggregate`.
    pub prefill: Option<Pick>,
    pub decode: Pick,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanError {
    /// No healthy decode engine (compatible with the chosen prefill engine, if any).
    NoDecodeEngine,
    /// Disaggregation is enforced and no prefill engine is available.
    NoPrefillEngine,
    /// Healthy decode engines exist but none has KV room for the request now.
    NoDecodeCapacity,
}

impl PlanError {
    /// Whether waiting (rather than failing) can help: capacity frees up as requests finish.
    pub fn is_capacity(self) -> bool {
        self == PlanError::NoDecodeCapacity
    }
}

impl std::fmt::Display for PlanError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PlanError::NoDecodeEngine => "no healthy decode engine is available",
            PlanError::NoPrefillEngine => {
                "no healthy prefill engine is available and disaggregation is enforced"
            }
            PlanError::NoDecodeCapacity => "no decode engine has KV cache room for the request",
        })
    }
}

impl std::error::Error for PlanError {}

fn candidates<'a>(pool: &'a [EngineView], exclude: &[usize]) -> Vec<&'a EngineView> {
    pool.iter()
        .filter(|e| e.routable() && !exclude.contains(&e.id))
        .collect()
}

fn pick(
    policy: &dyn Policy,
    c: &[&EngineView],
    facts: RouteFacts<'_>,
    rng: &mut dyn RngCore,
) -> Option<Pick> {
    let Choice { index, reason } = policy.choose(c, facts, rng)?;
    Some(Pick {
        id: c[index].id,
        reason,
    })
}

/// Plan one request against one snapshot.
pub fn plan(
    snap: &PoolSnapshot,
    req: &RouteRequest<'_>,
    settings: &DisaggSettings,
    prefill_policy: &dyn Policy,
    decode_policy: &dyn Policy,
    rng: &mut dyn RngCore,
) -> Result<Plan, PlanError> {
    let p_facts = RouteFacts {
        seq: req.seq,
        prompt_tokens: req.prompt_tokens,
        cached: req.prefill_cached,
        kv_blocks_needed: req.kv_blocks_needed,
        session: req.session,
    };
    let d_facts = RouteFacts {
        cached: req.decode_cached,
        ..p_facts
    };
    let prefill_c = candidates(&snap.prefill, req.exclude_prefill);
    let (decision, reason) = match req.force_local {
        Some(r) => (DisaggDecision::Local, r),
        None => decide(settings, req.uncached_tokens, &prefill_c),
    };
    if settings.enforce && decision == DisaggDecision::Local && reason.is_fallback() {
        return Err(PlanError::NoPrefillEngine);
    }
    let decode_all = candidates(&snap.decode, req.exclude_decode);
    match decision {
        DisaggDecision::Local => {
            if decode_all.is_empty() {
                return Err(PlanError::NoDecodeEngine);
            }
            Ok(Plan {
                decision,
                decision_reason: reason,
                prefill: None,
                decode: pick(decode_policy, &decode_all, d_facts, rng)
                    .ok_or(PlanError::NoDecodeCapacity)?,
            })
        }
        DisaggDecision::Disaggregate => {
            if decode_all.is_empty() {
                return Err(PlanError::NoDecodeEngine);
            }
            // Only prefill engines with at least one compatible decode partner are eligible.
            let prefill_ok: Vec<&EngineView> = prefill_c
                .iter()
                .copied()
                .filter(|p| decode_all.iter().any(|d| p.compatible_with(d)))
                .collect();
            if prefill_ok.is_empty() {
                return Err(PlanError::NoDecodeEngine);
            }
            // A capacity-aware policy (kv-capacity) may decline on the prefill pool too: no
            // prefill engine has room, which is a fallback like having none.
            let Some(p) = pick(prefill_policy, &prefill_ok, p_facts, rng) else {
                if settings.enforce {
                    return Err(PlanError::NoPrefillEngine);
                }
                return Ok(Plan {
                    decision: DisaggDecision::Local,
                    decision_reason: DisaggReason::NoPrefillEngine,
                    prefill: None,
                    decode: pick(decode_policy, &decode_all, d_facts, rng)
                        .ok_or(PlanError::NoDecodeCapacity)?,
                });
            };
            let pe = prefill_ok
                .iter()
                .find(|e| e.id == p.id)
                .expect("the pick came from this list");
            let decode_c: Vec<&EngineView> = decode_all
                .iter()
                .copied()
                .filter(|d| pe.compatible_with(d))
                .collect();
            Ok(Plan {
                decision,
                decision_reason: reason,
                prefill: Some(p),
                decode: pick(decode_policy, &decode_c, d_facts, rng)
                    .ok_or(PlanError::NoDecodeCapacity)?,
            })
        }
    }
}

/// Pick another decode engine for a request whose KV already sits on prefill engine
/// `prefill_id` (a decode retry with the same handoff params).
pub fn plan_decode(
    snap: &PoolSnapshot,
    facts: RouteFacts<'_>,
    exclude: &[usize],
    prefill_id: Option<usize>,
    policy: &dyn Policy,
    rng: &mut dyn RngCore,
) -> Result<Pick, PlanError> {
    let prefill = prefill_id.and_then(|id| snap.prefill.iter().find(|e| e.id == id));
    let c: Vec<&EngineView> = candidates(&snap.decode, exclude)
        .into_iter()
        .filter(|d| prefill.is_none_or(|p| p.compatible_with(d)))
        .collect();
    if c.is_empty() {
        return Err(PlanError::NoDecodeEngine);
    }
    pick(policy, &c, facts, rng).ok_or(PlanError::NoDecodeCapacity)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disagg::DisaggMode;
    use crate::policy::LeastLoaded;
    use crate::snapshot::Health;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn e(id: usize, health: Health, model: &str, inflight: u32) -> EngineView {
        EngineView {
            health,
            inflight,
            model: Some(model.into()),
            block_size: Some(16),
            ..EngineView::healthy(id, format!("http://e{id}"))
        }
    }

    const S: DisaggSettings = DisaggSettings {
        mode: DisaggMode::Always,
        enforce: false,
        local_max_uncached_tokens: 256,
        local_when_prefill_queue_tokens: 16384,
    };

    fn req<'a>(ex_p: &'a [usize], ex_d: &'a [usize]) -> RouteRequest<'a> {
        RouteRequest {
            seq: 0,
            prompt_tokens: 1000,
            uncached_tokens: 1000,
            exclude_prefill: ex_p,
            exclude_decode: ex_d,
            force_local: None,
            prefill_cached: &[],
            decode_cached: &[],
            kv_blocks_needed: 0,
            session: None,
        }
    }

    #[test]
    fn skips_unhealthy_and_excluded_and_pairs_compatible_engines() {
        let snap = PoolSnapshot {
            prefill: vec![
                e(0, Health::Unhealthy, "m", 0),
                e(1, Health::Healthy, "m", 5),
                e(2, Health::Healthy, "other", 0),
                e(3, Health::Healthy, "m", 0),
            ],
            decode: vec![
                e(0, Health::Healthy, "m", 0),
                e(1, Health::Draining, "m", 0),
            ],
        };
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let p = plan(
            &snap,
            &req(&[3], &[]),
            &S,
            &LeastLoaded,
            &LeastLoaded,
            &mut rng,
        )
        .unwrap();
        // 0 is unhealthy, 3 excluded, 2 has no compatible decode engine: only 1 remains.
        assert_eq!(p.prefill.unwrap().id, 1);
        assert_eq!(p.decode.id, 0);
        assert_eq!(p.decision, DisaggDecision::Disaggregate);
    }

    #[test]
    fn falls_back_locally_or_errors_when_enforced() {
        let snap = PoolSnapshot {
            prefill: vec![e(0, Health::Unhealthy, "m", 0)],
            decode: vec![e(0, Health::Healthy, "m", 0)],
        };
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let p = plan(
            &snap,
            &req(&[], &[]),
            &S,
            &LeastLoaded,
            &LeastLoaded,
            &mut rng,
        )
        .unwrap();
        assert_eq!(p.decision, DisaggDecision::Local);
        assert_eq!(p.decision_reason, DisaggReason::NoPrefillEngine);
        assert!(p.prefill.is_none());
        let enforced = DisaggSettings { enforce: true, ..S };
        assert_eq!(
            plan(
                &snap,
                &req(&[], &[]),
                &enforced,
                &LeastLoaded,
                &LeastLoaded,
                &mut rng
            ),
            Err(PlanError::NoPrefillEngine)
        );
        assert_eq!(
            plan(
                &snap,
                &req(&[], &[0]),
                &S,
                &LeastLoaded,
                &LeastLoaded,
                &mut rng
            ),
            Err(PlanError::NoDecodeEngine)
        );
    }

    /// Every prefill × decode policy combination plans without panicking, including a
    /// capacity-aware policy on the prefill pool when no prefill engine has KV room (the request
    /// then runs locally, or fails with `enforce`).
    #[test]
    fn every_policy_pair_plans_or_fails_cleanly() {
        use crate::policy::{policy_for, PolicyKind};
        use crate::prefix::PrefixParams;
        let kinds = || {
            [
                PolicyKind::LeastLoaded,
                PolicyKind::LeastRequests,
                PolicyKind::PowerOfTwo,
                PolicyKind::RoundRobin,
                PolicyKind::Random,
                PolicyKind::Prefix(PrefixParams::default()),
                PolicyKind::KvCapacity,
            ]
        };
        let full = |id| EngineView {
            kv_total_blocks: Some(100),
            kv_used_blocks: Some(100),
            ..e(id, Health::Healthy, "m", 0)
        };
        let roomy = |id| EngineView {
            kv_total_blocks: Some(100_000),
            kv_used_blocks: Some(0),
            ..e(id, Health::Healthy, "m", 0)
        };
        let snap = PoolSnapshot {
            prefill: vec![full(0), full(1)],
            decode: vec![roomy(0), roomy(1)],
        };
        let mut r = req(&[], &[]);
        r.kv_blocks_needed = 10;
        for enforce in [false, true] {
            let s = DisaggSettings { enforce, ..S };
            for p in kinds() {
                for d in kinds() {
                    let (pp, dp) = (policy_for(p), policy_for(d));
                    let mut rng = ChaCha8Rng::seed_from_u64(1);
                    match plan(&snap, &r, &s, pp.as_ref(), dp.as_ref(), &mut rng) {
                        Ok(plan) => {
                            let declines = p == PolicyKind::KvCapacity;
                            assert_eq!(plan.prefill.is_none(), declines, "{p:?} {d:?}");
                            assert!(!(declines && enforce), "{p:?} {d:?}");
                            if declines {
                                assert_eq!(plan.decision_reason, DisaggReason::NoPrefillEngine);
                            }
                        }
                        Err(e) => assert!(
                            enforce && e == PlanError::NoPrefillEngine,
                            "{p:?} {d:?}: {e}"
                        ),
                    }
                }
            }
        }
    }
}
