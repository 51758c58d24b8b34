//! The shared budgets: each tenant's two token buckets in Redis, checked and taken by one Lua
//! script per request (atomic: every replica sees one budget), on Redis's clock (replicas'
//! clocks may differ). Output tokens are batched per tenant and added by a second script.
//!
//! Redis being unreachable is never an outage: a check that fails or takes longer than
//! `limits.redis_timeout_ms` marks the backend down, and until a reconnect (tried every
//! `limits.redis_retry_ms`) answers a PING, checks are decided from the local buckets, which
//! follow every admission made through Redis for that purpose.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, Script};
use tandem_config::{LimitsConfig, TenantLimits};
use tokio::sync::Notify;

use super::local::Levels;
use crate::metrics::Metrics;

/// A bucket is a hash {level, at}: its level at `at` (ms on the server's clock). Missing means
/// full, and a bucket left alone for as long as a refill to full takes expires, so idle
/// tenants cost no memory. The maths is `local::Bucket`'s.
const PRELUDE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function level(key, cap)
  local v = redis.call('HMGET', key, 'level', 'at')
  local l, at = tonumber(v[1]), tonumber(v[2])
  if l == nil or at == nil then return cap end
  local dt = now - at
  if dt < 0 then dt = 0 end
  return math.min(cap, l + dt * cap / 60000)
end
local function store(key, cap, l)
  redis.call('HSET', key, 'level', tostring(l), 'at', tostring(now))
  redis.call('PEXPIRE', key, math.ceil((cap - l) * 60000 / cap) + 1000)
end
";

/// KEYS: the request bucket, the token bucket. ARGV: requests per minute, tokens per minute
/// (0 = no such limit), the request's prompt tokens. Returns {admitted, request level × 1000,
/// token level × 1000}; a refused request takes nothing.
const ADMIT: &str = r"
local rpm, tpm, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local r, k = 0, 0
if rpm > 0 then r = level(KEYS[1], rpm) end
if tpm > 0 then k = level(KEYS[2], tpm) end
local ok = (rpm == 0 or r >= 1) and (tpm == 0 or k >= cost)
if ok then
  if rpm > 0 then r = r - 1; store(KEYS[1], rpm, r) end
  if tpm > 0 then k = k - cost; store(KEYS[2], tpm, k) end
end
return {ok and 1 or 0, math.floor(r * 1000), math.floor(k * 1000)}
";

/// KEYS: the token bucket. ARGV: tokens per minute, tokens to take (negative: give back).
const CHARGE: &str = r"
local tpm, n = tonumber(ARGV[1]), tonumber(ARGV[2])
local k = level(KEYS[1], tpm) - n
if k > tpm then k = tpm end
store(KEYS[1], tpm, k)
return 0
";

pub(crate) struct Shared {
    client: Client,
    conn: Mutex<Option<MultiplexedConnection>>,
    up: AtomicBool,
    /// Wakes the reconnect task when a check finds Redis gone.
    down: Arc<Notify>,
    /// Output tokens not yet added in Redis, per tenant (with its tokens per minute): one entry
    /// per tenant at most, however many streams it has.
    pending: Mutex<HashMap<String, (i64, u64)>>,
    flush: Arc<Notify>,
    admit: Script,
    charge: Script,
    prefix: String,
    timeout: Duration,
    retry: Duration,
    metrics: Arc<Metrics>,
}

// By hand: the client's connection info may hold a password.
impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("up", &self.is_up())
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Both tasks hold only a `Weak`: woken, they find it gone and end.
        self.down.notify_one();
        self.flush.notify_one();
    }
}

impl Shared {
    /// Parses the URL (a bad one fails start-up) and starts the connect and flush tasks; the
    /// backend counts as down until the first connection answers.
    pub fn start(cfg: &LimitsConfig, metrics: Arc<Metrics>) -> Result<Arc<Shared>, String> {
        let url = cfg.redis_url.as_deref().unwrap_or_default();
        // The client's error may quote the URL, and with it a password.
        let client = Client::open(url)
            .map_err(|_| "limits.redis_url is not a valid Redis URL".to_string())?;
        metrics.access.limits_backend_up.set(0);
        let s = Arc::new(Shared {
            client,
            conn: Mutex::new(None),
            up: AtomicBool::new(false),
            down: Arc::new(Notify::new()),
            pending: Mutex::new(HashMap::new()),
            flush: Arc::new(Notify::new()),
            admit: Script::new(&format!("{PRELUDE}{ADMIT}")),
            charge: Script::new(&format!("{PRELUDE}{CHARGE}")),
            prefix: cfg.redis_key_prefix.clone(),
            timeout: Duration::from_millis(cfg.redis_timeout_ms),
            retry: Duration::from_millis(cfg.redis_retry_ms),
            metrics,
        });
        tokio::spawn(connect_loop(Arc::downgrade(&s), s.down.clone()));
        tokio::spawn(flush_loop(Arc::downgrade(&s), s.flush.clone()));
        Ok(s)
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::SeqCst)
    }

    fn key(&self, tenant: &str, which: &str) -> String {
        // The braces are a hash tag: a tenant's buckets share a Redis Cluster slot, as one
        // script's keys must.
        format!("{}:limits:{{{tenant}}}:{which}", self.prefix)
    }

    /// The check through Redis; `None` when Redis did not answer in time (now marked down).
    pub async fn admit(&self, tenant: &str, l: &TenantLimits, cost: u64) -> Option<Levels> {
        let mut conn = self.conn.lock().expect("redis lock").clone()?;
        let mut inv = self.admit.prepare_invoke();
        inv.key(self.key(tenant, "requests"))
            .key(self.key(tenant, "tokens"))
            .arg(l.requests_per_minute.unwrap_or(0))
            .arg(l.tokens_per_minute.unwrap_or(0))
            .arg(cost);
        let r: Vec<i64> = self.run(inv.invoke_async(&mut conn)).await?;
        let [ok, req, tok] = r[..] else {
            self.mark_down("the admission script answered an unexpected shape");
            return None;
        };
        Some(Levels {
            admitted: ok == 1,
            requests: l.requests_per_minute.map(|_| req as f64 / 1000.0),
            tokens: l.tokens_per_minute.map(|_| tok as f64 / 1000.0),
        })
    }

    /// Add `n` tokens to the tenant's bucket soon (batched with the tenant's other streams).
    pub fn charge(&self, tenant: &str, tpm: u64, n: i64) {
        if !self.is_up() || n == 0 {
            return;
        }
        let mut p = self.pending.lock().expect("redis lock");
        let e = p.entry(tenant.to_string()).or_insert((0, tpm));
        *e = (e.0 + n, tpm);
        drop(p);
        self.flush.notify_one();
    }

    async fn run<T>(
        &self,
        call: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Option<T> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(v)) => Some(v),
            Ok(Err(e)) => {
                self.mark_down(&e.to_string());
                None
            }
            Err(_) => {
                self.mark_down("no answer within limits.redis_timeout_ms");
                None
            }
        }
    }

    fn mark_down(&self, why: &str) {
        *self.conn.lock().expect("redis lock") = None;
        if self.up.swap(false, Ordering::SeqCst) {
            self.metrics.access.limits_backend_up.set(0);
            tracing::warn!(
                error = why,
                "Redis limits backend unreachable: tenants' budgets are now counted in this \
                 process alone (each replica grants the whole budget) until it answers again"
            );
            self.down.notify_one();
        }
    }

    /// One connection attempt and a PING, within the retry period.
    async fn connect(&self) -> bool {
        let cfg = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.retry))
            .set_response_timeout(Some(self.retry));
        let attempt = async {
            let mut c = self
                .client
                .get_multiplexed_async_connection_with_config(&cfg)
                .await?;
            redis::cmd("PING").query_async::<String>(&mut c).await?;
            Ok::<_, redis::RedisError>(c)
        };
        match tokio::time::timeout(self.retry, attempt).await {
            Ok(Ok(c)) => {
                *self.conn.lock().expect("redis lock") = Some(c);
                self.up.store(true, Ordering::SeqCst);
                self.metrics.access.limits_backend_up.set(1);
                tracing::info!("Redis limits backend reachable: tenants' budgets are shared");
                true
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "Redis limits backend: connection attempt failed");
                false
            }
            Err(_) => false,
        }
    }
}

/// While the backend is down, try to connect every `retry`; while it is up, wait for a check to
/// find it down.
async fn connect_loop(shared: Weak<Shared>, down: Arc<Notify>) {
    let mut first = true;
    loop {
        let Some(s) = shared.upgrade() else { return };
        if s.is_up() {
            drop(s);
            down.notified().await;
            continue;
        }
        if !s.connect().await && first {
            tracing::warn!(
                "Redis limits backend unreachable at start-up: tenants' budgets are counted in \
                 this process until it answers"
            );
        }
        first = false;
        let retry = s.retry;
        drop(s);
        if shared.strong_count() > 0 {
            tokio::time::sleep(retry).await;
        }
    }
}

/// Send pending output tokens to Redis, one script call per tenant. Tokens that cannot be sent
/// (Redis went down) are dropped: the local buckets already counted them.
async fn flush_loop(shared: Weak<Shared>, flush: Arc<Notify>) {
    loop {
        flush.notified().await;
        let Some(s) = shared.upgrade() else { return };
        let batch = std::mem::take(&mut *s.pending.lock().expect("redis lock"));
        for (tenant, (n, tpm)) in batch {
            let Some(mut conn) = s.conn.lock().expect("redis lock").clone() else {
                break;
            };
            let mut inv = s.charge.prepare_invoke();
            inv.key(s.key(&tenant, "tokens")).arg(tpm).arg(n);
            if s.run(inv.invoke_async::<i64>(&mut conn)).await.is_none() {
                break;
            }
        }
    }
}
