//! Per-tenant budgets, checked after parsing and before any engine work: requests per minute,
//! prompt + output tokens per minute, and requests in flight.
//!
//! Each rate budget is a token bucket holding a minute's allowance and refilled continuously
//! (`local.rs`). A request needs one request and its prompt tokens (as Tandem's tokenizer counts
//! them) in the buckets; its output tokens are taken as its content chunks go out, and at its
//! end the whole is settled from the answer's `usage` when it carries one. Buckets live in this
//! process or, with `[limits] backend = "redis"`, in Redis, shared by every replica
//! (`redis.rs`), with the local buckets as the fallback. Requests in flight are counted per
//! process. A refusal is 429 with `Retry-After` and OpenAI's `x-ratelimit-*` headers (written in
//! `error.rs`), counted in `tandem_limits_rejected_total{tenant, reason}`.

mod local;
mod redis;

use std::sync::Arc;

use tandem_config::{LimitsBackend, LimitsConfig, Tenant};
use tokio::time::Instant;

use crate::error::ProxyError;
use crate::front::Parsed;
use crate::metrics::{LimitLabels, Metrics};
use crate::timing::Finisher;
use crate::State;
use local::{Levels, Local, TenantState};

/// One limit's state as OpenAI reports it: `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateDim {
    pub limit: u64,
    pub remaining: u64,
    /// Until the bucket is full again.
    pub reset_ms: u64,
}

impl RateDim {
    fn new(cap: u64, level: f64) -> RateDim {
        RateDim {
            limit: cap,
            remaining: level.max(0.0).floor() as u64,
            reset_ms: local::ms_until(level, cap as f64, cap),
        }
    }
}

/// The headers of a tenant's answer; a limit the tenant does not have is absent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RateHeaders {
    pub requests: Option<RateDim>,
    pub tokens: Option<RateDim>,
}

/// Why a request was refused: the `reason` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Requests,
    Tokens,
    Concurrency,
    /// The prompt alone is more than the tenant's tokens per minute: it can never pass.
    TooLarge,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Requests => "requests",
            Reason::Tokens => "tokens",
            Reason::Concurrency => "concurrency",
            Reason::TooLarge => "too_large",
        }
    }
}

/// A refusal, as `ProxyError::RateLimited` carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limited {
    pub reason: Reason,
    pub message: String,
    /// Seconds; `None` where waiting cannot help.
    pub retry_after: Option<u64>,
    pub headers: RateHeaders,
}

/// The budgets of every tenant, and where they are kept.
#[derive(Debug)]
pub(crate) struct Limiter {
    local: Local,
    shared: Option<Arc<redis::Shared>>,
    metrics: Arc<Metrics>,
    epoch: Instant,
}

impl Limiter {
    pub fn new(cfg: &LimitsConfig, metrics: Arc<Metrics>) -> Result<Limiter, String> {
        let shared = match cfg.backend {
            LimitsBackend::Local => {
                metrics.access.limits_backend_up.set(1);
                None
            }
            LimitsBackend::Redis => Some(redis::Shared::start(cfg, metrics.clone())?),
        };
        Ok(Limiter {
            local: Local::default(),
            shared,
            metrics,
            epoch: Instant::now(),
        })
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// For `/ready`'s warnings: limits are degraded, not unready.
    pub fn warning(&self) -> Option<&'static str> {
        self.shared
            .as_ref()
            .filter(|s| !s.is_up())
            .map(|_| "limits backend redis unreachable: tenants' budgets are counted per process")
    }

    /// Admit a request of `tenant` with `prompt` tokens, or say why not.
    pub async fn admit(
        self: &Arc<Self>,
        tenant: &Arc<Tenant>,
        prompt: u64,
    ) -> Result<(Permit, RateHeaders), Box<Limited>> {
        let l = tenant.limits;
        let state = self.local.state(&tenant.name);
        let refuse = |reason, message, retry_after, headers| {
            self.count(tenant, reason);
            Box::new(Limited {
                reason,
                message,
                retry_after,
                headers,
            })
        };
        if let Some(tpm) = l.tokens_per_minute.filter(|tpm| prompt > *tpm) {
            let msg = format!(
                "Request too large for tenant {}: the prompt has {prompt} tokens and the limit \
                 is {tpm} tokens per minute.",
                tenant.name
            );
            return Err(refuse(Reason::TooLarge, msg, None, RateHeaders::default()));
        }
        // In flight first: local, and it holds nothing back from the buckets if refused. The
        // slot is a guard from here on, so a client gone during the Redis call frees it.
        let slot = match l.max_concurrent_requests {
            Some(max) if !state.enter(max) => {
                let msg = format!(
                    "Rate limit reached for tenant {}: {max} requests in flight at once.",
                    tenant.name
                );
                return Err(refuse(
                    Reason::Concurrency,
                    msg,
                    Some(1),
                    RateHeaders::default(),
                ));
            }
            Some(_) => Some(Slot(state.clone())),
            None => None,
        };
        let levels = if l.requests_per_minute.is_none() && l.tokens_per_minute.is_none() {
            Levels {
                admitted: true,
                requests: None,
                tokens: None,
            }
        } else {
            self.check(tenant, &state, prompt).await
        };
        let headers = RateHeaders {
            requests: l
                .requests_per_minute
                .zip(levels.requests)
                .map(|(cap, lv)| RateDim::new(cap, lv)),
            tokens: l
                .tokens_per_minute
                .zip(levels.tokens)
                .map(|(cap, lv)| RateDim::new(cap, lv)),
        };
        if !levels.admitted {
            drop(slot);
            // The dimension that is short the longest decides the wait.
            let wait_r = l
                .requests_per_minute
                .zip(levels.requests)
                .map_or(0, |(cap, lv)| local::ms_until(lv, 1.0, cap));
            let wait_t = l
                .tokens_per_minute
                .zip(levels.tokens)
                .map_or(0, |(cap, lv)| local::ms_until(lv, prompt as f64, cap));
            let (reason, what) = if wait_r >= wait_t {
                let n = l.requests_per_minute.unwrap_or(0);
                (Reason::Requests, format!("{n} requests per minute"))
            } else {
                let n = l.tokens_per_minute.unwrap_or(0);
                (Reason::Tokens, format!("{n} tokens per minute"))
            };
            let secs = wait_r.max(wait_t).div_ceil(1000).max(1);
            let msg = format!(
                "Rate limit reached for tenant {}: {what}. Please try again in {secs}s.",
                tenant.name
            );
            return Err(refuse(reason, msg, Some(secs), headers));
        }
        let permit = Permit(Arc::new(PermitInner {
            limiter: self.clone(),
            tenant: tenant.clone(),
            state,
            _slot: slot,
        }));
        Ok((permit, headers))
    }

    /// The rate buckets: through Redis while it answers, else here.
    async fn check(&self, tenant: &Tenant, state: &TenantState, prompt: u64) -> Levels {
        let l = &tenant.limits;
        if let Some(s) = &self.shared {
            if s.is_up() {
                if let Some(levels) = s.admit(&tenant.name, l, prompt).await {
                    if levels.admitted {
                        state.take(l, prompt, self.now_ms());
                    }
                    return levels;
                }
            }
            if self.metrics.enabled() {
                self.metrics.access.limits_fallback.inc();
            }
        }
        state.admit(l, prompt, self.now_ms())
    }

    fn count(&self, tenant: &Tenant, reason: Reason) {
        if self.metrics.enabled() {
            self.metrics
                .access
                .limits_rejected
                .get_or_create(&LimitLabels {
                    tenant: tenant.name.clone(),
                    reason: reason.as_str(),
                })
                .inc();
        }
    }
}

/// A tenant's request in flight, counted while it lives.
#[derive(Debug)]
struct Slot(Arc<TenantState>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.leave();
    }
}

#[derive(Debug)]
struct PermitInner {
    limiter: Arc<Limiter>,
    tenant: Arc<Tenant>,
    state: Arc<TenantState>,
    _slot: Option<Slot>,
}

/// An admitted request: it charges its output tokens through this, and frees its in-flight
/// slot when the last clone (a prompt list's parts share one) is dropped.
#[derive(Debug, Clone)]
pub(crate) struct Permit(Arc<PermitInner>);

impl Permit {
    /// Take `n` more tokens from the tenant's budget (negative: give back an overcount).
    pub fn charge(&self, n: i64) {
        let p = &self.0;
        let Some(tpm) = p.tenant.limits.tokens_per_minute else {
            return;
        };
        if n == 0 {
            return;
        }
        p.state.charge(tpm, n, p.limiter.now_ms());
        if let Some(s) = &p.limiter.shared {
            s.charge(&p.tenant.name, tpm, n);
        }
    }
}

/// The request path's check, after parsing: a request with no tenant (authentication off) has
/// no budget. Admitted, the permit goes in `fin` (which charges output as it streams and
/// settles at the end), and the headers come back for the answer.
pub(crate) async fn admit(
    st: &State,
    tenant: Option<&Arc<Tenant>>,
    req: &Parsed,
    fin: &mut Finisher,
) -> Result<Option<RateHeaders>, ProxyError> {
    let Some(tenant) = tenant else {
        return Ok(None);
    };
    match st.limits.admit(tenant, req.prompt_tokens).await {
        Ok((permit, headers)) => {
            fin.set_permit(permit, req.prompt_tokens);
            Ok(Some(headers))
        }
        Err(l) => Err(ProxyError::RateLimited(l)),
    }
}

/// OpenAI's spelling of a reset time: `20ms`, `1.5s`, `6m0s`.
pub(crate) fn reset_str(ms: u64) -> String {
    if ms < 1_000 {
        return format!("{ms}ms");
    }
    let (m, rest) = (ms / 60_000, ms % 60_000);
    let s = format!("{:.3}", rest as f64 / 1000.0);
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if m == 0 {
        format!("{s}s")
    } else {
        format!("{m}m{s}s")
    }
}

#[cfg(test)]
mod tests;
