//! The prefill leg: the prompt with `do_remote_decode` and one token, run in a task of its own
//! so that the KV it pins is always either handed to the request or released.

use std::sync::Arc;

use bytes::Bytes;

use crate::engine::error::{retry, ErrorKind, LegError};
use crate::engine::Leg;
use crate::front::Kind;
use crate::handoff::{self, Handoff};
use crate::pool::Engine;
use crate::trace::Outgoing;
use crate::State;

/// A finished prefill: its handoff (`None`: the engine kept no KV for us) and the cached
/// tokens it reported.
pub struct PrefillDone {
    pub handoff: Option<Handoff>,
    pub cached: Option<u64>,
}

/// What a prefill leg needs, owned, so it can outlive the request that started it.
pub struct PrefillJob {
    pub kind: Kind,
    pub body: Bytes,
    pub prompt_ids: Arc<[u32]>,
    pub prompt_tokens: u64,
    /// The prompt's uncached tokens as predicted: its queued work on the engine.
    pub work_tokens: u64,
    /// Decode KV blocks the request needs (for a release leg's reservation).
    pub blocks: u64,
    pub request_id: String,
    pub trace: Outgoing,
}

/// Run the prefill leg in its own task. If the client goes away while it runs, the task still
/// reads the engine's answer: an engine that finished the prefill has pinned its KV, and only
/// the params in that answer can release it (dropping the connection then would leave it pinned
/// for the whole lease). The handoff is made inside the task, so it is released however the
/// result is dropped.
pub fn spawn(
    st: &Arc<State>,
    engine: &Arc<Engine>,
    job: PrefillJob,
) -> impl std::future::Future<Output = Result<PrefillDone, LegError>> {
    let task = tokio::spawn(leg(st.clone(), engine.clone(), job));
    async move {
        task.await.unwrap_or_else(|e| {
            tracing::error!(error = %e, "prefill task failed");
            Err(retry(ErrorKind::Task, "the prefill leg failed", false))
        })
    }
}

async fn leg(
    st: Arc<State>,
    engine: Arc<Engine>,
    job: PrefillJob,
) -> Result<PrefillDone, LegError> {
    let engine = &engine;
    let work_tokens = job.work_tokens;
    // Queued work is what the engine must compute: the prompt less what it is predicted to hold.
    let _load = engine.track(work_tokens);
    let mut rate = RateLeg::begin(engine);
    let leg = async {
        let answer = engine
            .client
            .prefill(
                engine,
                Leg {
                    kind: job.kind,
                    request_id: &job.request_id,
                    trace: &job.trace,
                },
                &job.body,
                &job.prompt_ids,
            )
            .await?;
        let cached = answer.cached;
        // What the engine computed: the prompt less what it says it had (any tier), plus the
        // per-request cost the `prefix` policy charges each request in flight, so the rate
        // does not depend on how cached or short an engine's prompts happen to be.
        let computed = cached.map_or(work_tokens, |c| job.prompt_tokens.saturating_sub(c));
        rate.work = computed + st.cfg.routing.request_cost_tokens;
        let handoff = answer.params.map(|p| {
            Handoff::new(
                &st,
                p,
                handoff::Origin {
                    kind: job.kind,
                    prefill_body: &job.body,
                    prompt_ids: &job.prompt_ids,
                    blocks: job.blocks,
                    request_id: &job.request_id,
                    trace: &job.trace,
                    prefill_engine: engine.id,
                },
            )
        });
        Ok(PrefillDone { handoff, cached })
    };
    let result = match tokio::time::timeout(st.deadlines.prefill, leg).await {
        Ok(r) => r,
        Err(_) => Err(retry(
            ErrorKind::Timeout,
            format!(
                "the prefill engine did not answer within {} ms",
                st.deadlines.prefill.as_millis()
            ),
            false,
        )),
    };
    // Reported here rather than by the request, which may have gone: outlier detection counts
    // every leg (an engine's own refusal of a body is an answer, so a success).
    match &result {
        Ok(_) | Err(LegError::Relay(_)) => st.pools.succeeded(engine, None),
        Err(LegError::Retry(e)) => st.pools.failed(engine, e.kind, e.suspect, None),
    }
    result
}

/// One prefill leg in the engine's throughput estimate: begun when made, ended when dropped with
/// the work the leg reported computing (none if it failed or was abandoned).
struct RateLeg<'a> {
    engine: &'a Engine,
    work: u64,
}

impl<'a> RateLeg<'a> {
    fn begin(engine: &'a Engine) -> Self {
        engine.rate.begin(engine.secs());
        RateLeg { engine, work: 0 }
    }
}

impl Drop for RateLeg<'_> {
    fn drop(&mut self) {
        self.engine.rate.end(self.engine.secs(), self.work);
    }
}
