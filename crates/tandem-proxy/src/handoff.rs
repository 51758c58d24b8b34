//! A prefill's pinned KV, owned by the request until a decode engine takes it or Tandem gives it
//! back.
//!
//! A prefill that returns `kv_transfer_params` leaves its blocks pinned on the prefill engine
//! until a decode engine reads them and notifies it, or until vLLM's lease runs out (480 s by
//! default). Every path that drops such a handoff without a decode engine having begun the
//! request (the client went away, decode admission refused, a decode leg failed, retries ran
//! out) would leave those blocks pinned for the whole lease: under sustained load a capacity
//! leak that feeds itself. So the params live in a [`Handoff`], and dropping one sends a
//! *release leg* to a decode engine, in one of two forms:
//!
//! - **pull** (no decode engine has seen the params, so the blocks are certainly still pinned):
//!   the request with its params and `max_tokens = 1`. Every vLLM version honours it: the decode
//!   engine pulls the blocks, notifies the prefill engine and finishes. Cut at
//!   `timeouts.release_ms` (a full decode engine queues it), the decode engine aborts a request
//!   that has not received its KV, and still notifies the prefill engine.
//! - **reject** (a decode engine saw the params and failed, or the client left while it had
//!   them, so the blocks may already be free and may even have been reused): the same request
//!   with `max_tokens = 0`, which the decode engine's serving layer rejects before it reaches
//!   the engine, releasing the remote blocks (`notify_kv_transfer_request_rejected`). Nothing is
//!   read, so blocks already freed and reused are never pulled into the decode engine's prefix
//!   cache; a second notification for a freed request is only logged by the prefill engine.
//!
//! A pull that never reached its engine is followed by rejects; one that reached it and was cut
//! is left to that engine's abort (a reject then could free the blocks mid-read). Every handoff ends with one counted
//! outcome (`tandem_handoffs_total{outcome}`); the live ones are listed, with their age, by
//! `GET /admin/requests/pinned`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use serde_json::Value;
use tandem_policy::{Health, PoolKind};

use crate::engine::{KvParams, Leg, Sent};
use crate::front::Kind;
use crate::pool::Engine;
use crate::trace::Outgoing;
use crate::State;

/// How a handoff ended. Bounded: these are the `outcome` label values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A decode engine began the request (its first token or whole answer arrived).
    Delivered,
    /// A decode engine refused the request at its serving layer (a 4xx), which frees the
    /// prefill's blocks (vLLM's `notify_kv_transfer_request_rejected`).
    Rejected,
    /// A pull release leg pulled the blocks and finished.
    Released,
    /// A release leg was refused by a decode engine's serving layer, which frees them.
    ReleaseRejected,
    /// The pull was cut at `timeouts.release_ms` or answered with an error, or no reject was
    /// answered: the blocks are free only if an aborting decode engine notified the prefill
    /// engine (as vLLM does for a request that had not received its KV).
    ReleaseFailed,
    /// No decode engine could take a release leg: the blocks stay pinned until the lease.
    Leaked,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Delivered => "delivered",
            Outcome::Rejected => "rejected",
            Outcome::Released => "released",
            Outcome::ReleaseRejected => "release_rejected",
            Outcome::ReleaseFailed => "release_failed",
            Outcome::Leaked => "leaked",
        }
    }
}

/// A live handoff as `/admin/requests/pinned` shows it.
#[derive(Debug, Clone)]
struct Live {
    request_id: String,
    prefill_engine: usize,
    since: Instant,
    /// Set once the handoff is being released.
    releasing: bool,
}

/// The handoffs whose prefill KV is pinned now.
#[derive(Debug, Default)]
pub struct Registry {
    next: AtomicU64,
    live: Mutex<HashMap<u64, Live>>,
}

impl Registry {
    fn insert(&self, live: Live) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.live.lock().expect("handoff registry").insert(id, live);
        id
    }

    fn set_releasing(&self, id: u64) {
        if let Some(l) = self.live.lock().expect("handoff registry").get_mut(&id) {
            l.releasing = true;
        }
    }

    fn remove(&self, id: u64) {
        self.live.lock().expect("handoff registry").remove(&id);
    }

    pub fn len(&self) -> usize {
        self.live.lock().expect("handoff registry").len()
    }

    /// Live handoffs pinned for at least `min_age_ms`, oldest first.
    pub fn older_than(&self, min_age_ms: u64, now: Instant) -> Vec<Value> {
        let live = self.live.lock().expect("handoff registry");
        let mut out: Vec<(u128, Value)> = live
            .values()
            .filter_map(|l| {
                let age = now.saturating_duration_since(l.since).as_millis();
                (age >= u128::from(min_age_ms)).then(|| {
                    (
                        age,
                        serde_json::json!({
                            "request_id": l.request_id,
                            "prefill_engine": l.prefill_engine,
                            "pinned_ms": age as u64,
                            "state": if l.releasing { "releasing" } else { "pinned" },
                        }),
                    )
                })
            })
            .collect();
        out.sort_by_key(|(age, _)| std::cmp::Reverse(*age));
        out.into_iter().map(|(_, v)| v).collect()
    }
}

/// The params of one finished prefill, owned until the KV is taken or given back.
pub struct Handoff {
    st: Arc<State>,
    id: u64,
    params: Arc<KvParams>,
    kind: Kind,
    /// The prefill leg's body and prompt: the release leg is built from them only if one is
    /// needed.
    prefill_body: Bytes,
    prompt_ids: Arc<[u32]>,
    blocks: u64,
    request_id: String,
    trace: Outgoing,
    /// Decode engines that failed this handoff; a release leg goes elsewhere when it can.
    avoid: Vec<usize>,
    /// A decode engine has seen the params (see the module docs: release by reject only).
    seen: bool,
    prefill_engine: usize,
    done: bool,
}

impl std::fmt::Debug for Handoff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handoff")
            .field("id", &self.id)
            .field("request_id", &self.request_id)
            .finish_non_exhaustive()
    }
}

/// What one handoff needs besides the state: the request it belongs to.
pub struct Origin<'a> {
    pub kind: Kind,
    pub prefill_body: &'a Bytes,
    pub prompt_ids: &'a Arc<[u32]>,
    pub blocks: u64,
    pub request_id: &'a str,
    pub trace: &'a Outgoing,
    pub prefill_engine: usize,
}

impl Handoff {
    pub fn new(st: &Arc<State>, params: KvParams, o: Origin<'_>) -> Self {
        let id = st.handoffs.insert(Live {
            request_id: o.request_id.to_string(),
            prefill_engine: o.prefill_engine,
            since: Instant::now(),
            releasing: false,
        });
        st.metrics.handoffs_pinned.inc();
        Handoff {
            st: st.clone(),
            id,
            params: Arc::new(params),
            kind: o.kind,
            prefill_body: o.prefill_body.clone(),
            prompt_ids: o.prompt_ids.clone(),
            blocks: o.blocks,
            request_id: o.request_id.to_string(),
            trace: o.trace.clone(),
            avoid: Vec::new(),
            seen: false,
            prefill_engine: o.prefill_engine,
            done: false,
        }
    }

    /// The params are about to be sent to a decode engine; returns whether one had them before
    /// (for [`Handoff::unsent`]).
    pub fn sending(&mut self) -> bool {
        std::mem::replace(&mut self.seen, true)
    }

    /// The decode leg never reached its engine: restore what [`Handoff::sending`] returned.
    pub fn unsent(&mut self, seen_before: bool) {
        self.seen = seen_before;
    }

    /// The params, as the prefill engine issued them, for the decode leg.
    pub fn params(&self) -> &Arc<KvParams> {
        &self.params
    }

    /// A decode engine failed this handoff: release it elsewhere if another engine exists.
    pub fn avoid(&mut self, decode_engine: usize) {
        if !self.avoid.contains(&decode_engine) {
            self.avoid.push(decode_engine);
        }
    }

    /// A decode engine began the request: the KV is its now.
    pub fn delivered(mut self) {
        self.end(Outcome::Delivered);
    }

    /// A decode engine refused the request at its serving layer, which frees the blocks.
    pub fn rejected(mut self) {
        self.end(Outcome::Rejected);
    }

    fn end(&mut self, outcome: Outcome) {
        self.done = true;
        self.st.handoffs.remove(self.id);
        self.st.metrics.handoffs_pinned.dec();
        self.st.metrics.handoff(outcome.as_str());
    }
}

impl Drop for Handoff {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        self.done = true;
        self.st.handoffs.set_releasing(self.id);
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            // No runtime (process exit): nothing can be sent; the lease frees the blocks.
            self.st.handoffs.remove(self.id);
            self.st.metrics.handoffs_pinned.dec();
            self.st.metrics.handoff(Outcome::Leaked.as_str());
            return;
        };
        let leg = ReleaseLeg {
            st: self.st.clone(),
            id: self.id,
            kind: self.kind,
            pull: !self.seen,
            prefill_body: self.prefill_body.clone(),
            prompt_ids: self.prompt_ids.clone(),
            params: self.params.clone(),
            blocks: self.blocks,
            request_id: format!("{}-release", self.request_id),
            trace: self.trace.clone(),
            avoid: std::mem::take(&mut self.avoid),
            prefill_engine: self.prefill_engine,
        };
        rt.spawn(leg.run());
    }
}

struct ReleaseLeg {
    st: Arc<State>,
    id: u64,
    kind: Kind,
    /// No decode engine has seen the params: the blocks may be pulled.
    pull: bool,
    /// The prefill leg's body, which each release leg is built from for its engine.
    prefill_body: Bytes,
    prompt_ids: Arc<[u32]>,
    params: Arc<KvParams>,
    blocks: u64,
    request_id: String,
    trace: Outgoing,
    avoid: Vec<usize>,
    prefill_engine: usize,
}

/// Ends the leg's registry entry and gauge however the leg ends (even dropped at shutdown).
struct Ending<'a> {
    leg: &'a ReleaseLeg,
    outcome: Outcome,
}

impl Drop for Ending<'_> {
    fn drop(&mut self) {
        let st = &self.leg.st;
        st.handoffs.remove(self.leg.id);
        st.metrics.handoffs_pinned.dec();
        st.metrics.handoff(self.outcome.as_str());
    }
}

impl ReleaseLeg {
    async fn run(self) {
        let mut ending = Ending {
            leg: &self,
            outcome: Outcome::Leaked,
        };
        ending.outcome = self.send().await;
        let outcome = ending.outcome;
        drop(ending);
        if outcome == Outcome::Leaked {
            tracing::warn!(request_id = %self.request_id, "no decode engine could release a prefill's KV: it stays pinned until the engine's lease");
        } else {
            tracing::debug!(request_id = %self.request_id, outcome = outcome.as_str(), "handoff released");
        }
    }

    /// A pull on the best compatible decode engine while no decode engine has seen the params;
    /// rejects, on each engine in turn until one answers, if there is no pull or the pull never
    /// reached its engine (see the module docs). A pull that reached its engine and was cut is
    /// left to that engine's abort: a reject then could free the blocks while it reads them.
    async fn send(&self) -> Outcome {
        let targets = self.targets();
        if targets.is_empty() {
            return Outcome::Leaked;
        }
        if self.pull {
            if let Some((engine, _)) = targets.iter().find(|(_, compatible)| *compatible) {
                let _load = engine
                    .track(0)
                    .with_reservation(engine.reserve(self.blocks));
                match self.send_to(engine, 1).await {
                    Sent::Accepted => return Outcome::Released,
                    Sent::Refused => return Outcome::ReleaseRejected,
                    Sent::Failed | Sent::Cut => return Outcome::ReleaseFailed,
                    Sent::Unsent => {}
                }
            }
        }
        for (engine, _) in &targets {
            let _load = engine.track(0);
            match self.send_to(engine, 0).await {
                Sent::Refused => return Outcome::ReleaseRejected,
                Sent::Accepted | Sent::Failed => return Outcome::ReleaseFailed,
                Sent::Unsent | Sent::Cut => {}
            }
        }
        Outcome::ReleaseFailed
    }

    async fn send_to(&self, engine: &Arc<Engine>, max_tokens: u64) -> Sent {
        let leg = Leg {
            kind: self.kind,
            request_id: &self.request_id,
            trace: &self.trace,
        };
        engine
            .client
            .release(
                leg,
                &self.prefill_body,
                &self.prompt_ids,
                &self.params,
                max_tokens,
                self.st.deadlines.release,
            )
            .await
    }

    /// The healthy decode engines, each with whether its model and block size agree with the
    /// prefill engine's (only those may pull): compatible first, then those that have not
    /// failed this handoff, then the fewest requests in flight.
    fn targets(&self) -> Vec<(Arc<Engine>, bool)> {
        let pools = self.st.pools.pools.borrow().clone();
        let snap = pools.snapshot();
        let prefill = snap.prefill.iter().find(|e| e.id == self.prefill_engine);
        let mut c: Vec<(bool, bool, u32, Arc<Engine>)> = pools
            .pool(PoolKind::Decode)
            .iter()
            .filter(|e| e.status.health == Health::Healthy)
            .map(|e| {
                let compatible = match (prefill, snap.decode.iter().find(|d| d.id == e.engine.id)) {
                    (Some(p), Some(d)) => p.compatible_with(d),
                    _ => true,
                };
                let failed = self.avoid.contains(&e.engine.id);
                (!compatible, failed, e.engine.inflight(), e.engine.clone())
            })
            .collect();
        c.sort_by_key(|(incompatible, failed, inflight, e)| {
            (*incompatible, *failed, *inflight, e.id)
        });
        c.into_iter().map(|(inc, _, _, e)| (e, !inc)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::http::release_body;

    #[test]
    fn the_release_body_is_the_prefill_body_with_the_handoff_params_and_one_choice() {
        let prefill = Bytes::from_static(
            br#"{"prompt":"hi","n":4,"best_of":5,"max_tokens":1,"stream":false,"kv_transfer_params":{"do_remote_decode":true}}"#,
        );
        let params = r#"{"do_remote_prefill":true,"remote_block_ids":[1],"remote_port":5600.0}"#;
        let b = release_body(&prefill, params, 1).expect("a JSON body");
        let v: Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["kv_transfer_params"]["do_remote_prefill"], true);
        assert_eq!(v["kv_transfer_params"]["remote_block_ids"][0], 1);
        assert_eq!(v["n"], 1);
        assert!(v.get("best_of").is_none());
        assert_eq!(v["max_tokens"], 1);
        assert_eq!(v["stream"], false);
        assert_eq!(v["prompt"], "hi");
        let text = std::str::from_utf8(&b).unwrap();
        assert!(
            text.ends_with(&format!(r#""kv_transfer_params":{params}}}"#)),
            "{text}"
        );
        let reject = release_body(&prefill, params, 0).expect("a JSON body");
        let v: Value = serde_json::from_slice(&reject).unwrap();
        assert_eq!(
            v["max_tokens"], 0,
            "rejected by the serving layer, nothing read"
        );
        assert_eq!(v["kv_transfer_params"]["do_remote_prefill"], true);
    }

    #[test]
    fn the_registry_lists_handoffs_by_age_with_a_threshold() {
        let r = Registry::default();
        let now = Instant::now();
        let old = now - std::time::Duration::from_millis(900);
        let a = r.insert(Live {
            request_id: "a".into(),
            prefill_engine: 0,
            since: old,
            releasing: false,
        });
        r.insert(Live {
            request_id: "b".into(),
            prefill_engine: 1,
            since: now,
            releasing: false,
        });
        r.set_releasing(a);
        let listed = r.older_than(500, now);
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0]["request_id"], "a");
        assert_eq!(listed[0]["state"], "releasing");
        assert!(listed[0]["pinned_ms"].as_u64().unwrap() >= 900);
        assert_eq!(r.older_than(0, now).len(), 2);
        r.remove(a);
        assert_eq!(r.len(), 1);
    }
}
