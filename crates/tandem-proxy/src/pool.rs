//! The engine pools: the engine table, the control loop that is its only writer, and the
//! immutable snapshots request tasks read.
//!
//! Two kinds of state live here. Health, model, block size and KV capacity are written only by
//! the control loop and published whole as `Arc<Pools>` through a `watch` channel. The
//! coordinator's own load accounting (in-flight requests, queued prefill tokens) changes on every
//! request, so each engine keeps it in atomics that request tasks bump through [`LoadGuard`]s;
//! a policy still sees one consistent, immutable [`PoolSnapshot`] built per decision.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use tandem_config::{Config, DEFAULT_GROUP};
use tandem_policy::{EngineView, Health, PoolKind, PoolSnapshot};
use tokio::sync::{mpsc, watch, Notify};

use crate::engine::{EngineClient, Probe};
use crate::metrics::Metrics;
use crate::rate::PrefillRate;
use crate::tls::EngineTls;

mod outlier;

use outlier::{Missed, Outcome, Outliers};
pub use outlier::{OutlierView, State as OutlierState};

/// One engine Tandem routes to. Lives as long as any snapshot or request refers to it.
#[derive(Debug)]
pub struct Engine {
    pub id: usize,
    pub pool: PoolKind,
    pub url: Arc<str>,
    pub weight: f64,
    /// Its engine group (`tandem_config::DEFAULT_GROUP` when configured without one).
    pub group: Arc<str>,
    pub client: EngineClient,
    /// Found by DNS (drained when it leaves the answer) rather than configured.
    pub discovered: bool,
    inflight: AtomicU32,
    queued_prefill_tokens: AtomicU64,
    /// Legs ever sent to this engine.
    served: AtomicU64,
    /// KV blocks promised to requests a scrape cannot have seen yet (see [`Reservation`]).
    reservations: Mutex<Reservations>,
    reserved_blocks: AtomicU64,
    /// Metrics scrapes sent to this engine so far: a scrape numbered `n` sees every request the
    /// engine had started before scrape `n` was sent.
    scrapes_sent: AtomicU64,
    /// Wakes requests waiting for KV room when a reservation is released.
    freed: Arc<Notify>,
    /// Prefill throughput measured from this engine's prefill legs.
    pub rate: PrefillRate,
    /// Origin of the seconds `rate` is fed with.
    born: Instant,
    /// Failures whose report found the control loop's queue full (see `pool/outlier.rs`).
    missed: Missed,
}

/// Reservations by id: blocks, and the scrape count when the engine began the request (`None`
/// until it has).
#[derive(Debug, Default)]
struct Reservations {
    next: u64,
    open: HashMap<u64, (u64, Option<u64>)>,
}

impl Engine {
    pub fn inflight(&self) -> u32 {
        self.inflight.load(Ordering::Relaxed)
    }

    pub fn queued_prefill_tokens(&self) -> u64 {
        self.queued_prefill_tokens.load(Ordering::Relaxed)
    }

    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// Seconds since this engine entered the table, the clock its `rate` runs on.
    pub fn secs(&self) -> f64 {
        self.born.elapsed().as_secs_f64()
    }

    pub fn reserved_blocks(&self) -> u64 {
        self.reserved_blocks.load(Ordering::Relaxed)
    }

    /// Promise `blocks` KV blocks to a request routed here. They count against the engine's free
    /// blocks until the request ends or a scrape sent after it began shows them as used.
    pub fn reserve(self: &Arc<Self>, blocks: u64) -> Reservation {
        let mut r = self.reservations.lock().expect("reservations lock");
        let id = r.next;
        r.next += 1;
        r.open.insert(id, (blocks, None));
        self.reserved_blocks.fetch_add(blocks, Ordering::Relaxed);
        Reservation {
            engine: self.clone(),
            id,
        }
    }

    /// Number the next metrics scrape (called just before sending it).
    pub fn scrape_sent(&self) -> u64 {
        self.scrapes_sent.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// A scrape numbered `n` has been published: requests begun before it was sent are in its
    /// `kv_cache_usage_perc`, so their reservations stop counting (the scrape counts them now).
    pub fn scrape_published(&self, n: u64) {
        let mut r = self.reservations.lock().expect("reservations lock");
        let mut visible = 0;
        for (blocks, began) in r.open.values_mut() {
            if began.is_some_and(|b| b < n) && *blocks > 0 {
                visible += *blocks;
                *blocks = 0;
            }
        }
        if visible > 0 {
            self.reserved_blocks.fetch_sub(visible, Ordering::Relaxed);
        }
    }

    /// Count a request on this engine until the guard drops; `prefill_tokens` are counted as
    /// queued prefill work for the same span.
    pub fn track(self: &Arc<Self>, prefill_tokens: u64) -> LoadGuard {
        self.inflight.fetch_add(1, Ordering::Relaxed);
        self.served.fetch_add(1, Ordering::Relaxed);
        self.queued_prefill_tokens
            .fetch_add(prefill_tokens, Ordering::Relaxed);
        LoadGuard {
            engine: self.clone(),
            prefill_tokens,
            reservation: None,
        }
    }
}

/// KV blocks promised to one request on one decode engine; released when dropped.
#[derive(Debug)]
pub struct Reservation {
    engine: Arc<Engine>,
    id: u64,
}

impl Reservation {
    /// The engine has begun the request (its first token arrived, so its blocks are allocated):
    /// the next scrape sent will see them.
    pub fn began(&self) {
        let n = self.engine.scrapes_sent.load(Ordering::Relaxed);
        let mut r = self.engine.reservations.lock().expect("reservations lock");
        if let Some((_, began)) = r.open.get_mut(&self.id) {
            began.get_or_insert(n);
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let e = &self.engine;
        let blocks = {
            let mut r = e.reservations.lock().expect("reservations lock");
            r.open.remove(&self.id).map_or(0, |(b, _)| b)
        };
        if blocks > 0 {
            e.reserved_blocks.fetch_sub(blocks, Ordering::Relaxed);
        }
        e.freed.notify_waiters();
    }
}

/// Releases an engine's load accounting when the leg ends, however it ends.
#[derive(Debug)]
pub struct LoadGuard {
    engine: Arc<Engine>,
    prefill_tokens: u64,
    /// A decode leg's KV reservation, released with the leg.
    reservation: Option<Reservation>,
}

impl LoadGuard {
    pub fn with_reservation(mut self, r: Reservation) -> Self {
        self.reservation = Some(r);
        self
    }

    /// See [`Reservation::began`].
    pub fn began(&self) {
        if let Some(r) = &self.reservation {
            r.began();
        }
    }
}

impl Drop for LoadGuard {
    fn drop(&mut self) {
        self.engine.inflight.fetch_sub(1, Ordering::Relaxed);
        self.engine
            .queued_prefill_tokens
            .fetch_sub(self.prefill_tokens, Ordering::Relaxed);
        if self.prefill_tokens > 0 {
            // Requests held back by `admission.max_prefill_queue_tokens` may fit now.
            self.engine.freed.notify_waiters();
        }
    }
}

/// What the control loop knows about an engine.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineStatus {
    pub health: Health,
    pub model: Option<Arc<str>>,
    /// The engine's version where its protocol reports one (gRPC `ServerInfo.engine_version`):
    /// P/D pairs only engines of equal versions (vllm-grpc.md §5).
    pub engine_version: Option<Arc<str>>,
    pub block_size: Option<u32>,
    pub num_gpu_blocks: Option<u64>,
    pub kv_usage: Option<f64>,
    pub last_probe: Option<Instant>,
    pub last_scrape: Option<Instant>,
    /// Why the last probe failed, for `/ready` and `/admin/engines`.
    pub last_error: Option<String>,
    successes: u32,
    failures: u32,
    /// The probes' own verdict: `health` is this, but `Ejected` while outlier detection holds a
    /// healthy engine out, and `Draining` once it drains.
    probed: Health,
    /// Outlier detection and slow start (`pool/outlier.rs`).
    pub outlier: OutlierView,
}

impl EngineStatus {
    /// Used KV blocks at the last scrape: `num_gpu_blocks × kv_cache_usage_perc`.
    pub fn kv_used_blocks(&self) -> Option<u64> {
        let total = self.num_gpu_blocks?;
        let used = self.kv_usage.unwrap_or(0.0).clamp(0.0, 1.0);
        Some((total as f64 * used).round() as u64)
    }

    /// Free KV blocks at the last scrape.
    pub fn kv_free_blocks(&self) -> Option<u64> {
        Some(self.num_gpu_blocks? - self.kv_used_blocks()?)
    }
}

impl Default for EngineStatus {
    fn default() -> Self {
        EngineStatus {
            health: Health::Unknown,
            model: None,
            engine_version: None,
            block_size: None,
            num_gpu_blocks: None,
            kv_usage: None,
            last_probe: None,
            last_scrape: None,
            last_error: None,
            successes: 0,
            failures: 0,
            probed: Health::Unknown,
            outlier: OutlierView::default(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct EngineEntry {
    pub engine: Arc<Engine>,
    pub status: EngineStatus,
}

/// Both pools as last published by the control loop.
#[derive(Debug, Clone, Default)]
pub struct Pools {
    pub prefill: Vec<EngineEntry>,
    pub decode: Vec<EngineEntry>,
    /// Whether at least one probe round has finished.
    pub probed: bool,
}

impl Pools {
    pub fn pool(&self, kind: PoolKind) -> &[EngineEntry] {
        match kind {
            PoolKind::Prefill => &self.prefill,
            PoolKind::Decode => &self.decode,
        }
    }

    pub fn find(&self, kind: PoolKind, id: usize) -> Option<&EngineEntry> {
        self.pool(kind).iter().find(|e| e.engine.id == id)
    }

    /// The policy input: control-loop status plus the load counters as they are now.
    pub fn snapshot(&self) -> PoolSnapshot {
        fn views(es: &[EngineEntry]) -> Vec<EngineView> {
            es.iter()
                .map(|e| EngineView {
                    id: e.engine.id,
                    url: e.engine.url.clone(),
                    health: e.status.health,
                    // Ramped down while the engine slow-starts.
                    weight: e.engine.weight * e.status.outlier.weight_factor,
                    inflight: e.engine.inflight(),
                    queued_prefill_tokens: e.engine.queued_prefill_tokens(),
                    model: e.status.model.clone(),
                    block_size: e.status.block_size,
                    engine_version: e.status.engine_version.clone(),
                    kv_total_blocks: e.status.num_gpu_blocks,
                    kv_used_blocks: e.status.kv_used_blocks(),
                    kv_reserved_blocks: e.engine.reserved_blocks(),
                    prefill_tokens_per_sec: e.engine.rate.tokens_per_sec(),
                    group: Some(e.engine.group.clone()),
                })
                .collect()
        }
        PoolSnapshot {
            prefill: views(&self.prefill),
            decode: views(&self.decode),
        }
    }

    pub fn healthy(&self, kind: PoolKind) -> usize {
        self.pool(kind)
            .iter()
            .filter(|e| e.status.health == Health::Healthy)
            .count()
    }

    /// The served model name: the first one any engine reported (decode engines first).
    pub fn served_model(&self) -> Option<Arc<str>> {
        self.decode
            .iter()
            .chain(self.prefill.iter())
            .find_map(|e| e.status.model.clone())
    }
}

/// Handles for readers.
#[derive(Debug, Clone)]
pub struct PoolHandle {
    pub pools: watch::Receiver<Arc<Pools>>,
    /// Legs' outcomes for the control loop (see `PoolHandle::succeeded` and `failed`).
    outcomes: mpsc::Sender<Outcome>,
    /// Notified whenever a KV reservation is released (admission waits on it).
    pub freed: Arc<Notify>,
}

/// Resolves a pool's DNS name (a Kubernetes headless Service) to engine addresses.
pub trait Resolver: Send + Sync + std::fmt::Debug {
    fn resolve(
        &self,
        name: &str,
        port: u16,
    ) -> futures::future::BoxFuture<'static, std::io::Result<Vec<std::net::SocketAddr>>>;
}

/// The system resolver (`getaddrinfo`), re-asked every interval: no Kubernetes API, no RBAC.
#[derive(Debug, Clone, Copy)]
pub struct SystemResolver;

impl Resolver for SystemResolver {
    fn resolve(
        &self,
        name: &str,
        port: u16,
    ) -> futures::future::BoxFuture<'static, std::io::Result<Vec<std::net::SocketAddr>>> {
        let target = format!("{name}:{port}");
        Box::pin(async move { Ok(tokio::net::lookup_host(target).await?.collect()) })
    }
}

/// Legs' outcomes the control loop may be behind by; failures beyond it are still counted.
const OUTCOMES: usize = 4096;

/// Build the engine table from static endpoints and start the control loop.
pub fn start(
    cfg: &Config,
    metrics: Arc<Metrics>,
    resolver: Arc<dyn Resolver>,
    tls: EngineTls,
) -> PoolHandle {
    let mut ctl_ids = 0usize;
    let freed = Arc::new(Notify::new());
    let connect = Duration::from_millis(cfg.timeouts.connect_ms);
    let mut entries = |kind: PoolKind| -> Vec<EngineEntry> {
        let pool = pool_config(cfg, kind);
        pool.endpoints
            .iter()
            .map(|e| {
                ctl_ids += 1;
                let client =
                    EngineClient::new(pool.protocol, &e.url, e.metrics.as_deref(), connect, &tls);
                let group = e.group.as_deref().unwrap_or(DEFAULT_GROUP);
                let at = (e.weight, group);
                new_entry(ctl_ids - 1, kind, &e.url, at, false, client, &freed)
            })
            .collect()
    };
    let initial = Pools {
        prefill: entries(PoolKind::Prefill),
        decode: entries(PoolKind::Decode),
        probed: false,
    };
    let (tx, rx) = watch::channel(Arc::new(initial));
    let (otx, orx) = mpsc::channel(OUTCOMES);
    let ctl = Control {
        cfg: cfg.clone(),
        tx,
        outcomes: orx,
        outliers: Outliers::new(&cfg.outlier),
        tls,
        metrics,
        ratio_warned: false,
        resolver,
        next_id: ctl_ids,
        dns_due: [Instant::now(), Instant::now()],
        freed: freed.clone(),
    };
    tokio::spawn(ctl.run());
    PoolHandle {
        pools: rx,
        outcomes: otx,
        freed,
    }
}

fn new_entry(
    id: usize,
    pool: PoolKind,
    url: &str,
    (weight, group): (f64, &str),
    discovered: bool,
    client: EngineClient,
    freed: &Arc<Notify>,
) -> EngineEntry {
    EngineEntry {
        engine: Arc::new(Engine {
            id,
            pool,
            url: url.into(),
            weight,
            group: group.into(),
            client,
            discovered,
            inflight: AtomicU32::new(0),
            queued_prefill_tokens: AtomicU64::new(0),
            served: AtomicU64::new(0),
            rate: PrefillRate::default(),
            born: Instant::now(),
            reservations: Mutex::new(Reservations::default()),
            reserved_blocks: AtomicU64::new(0),
            scrapes_sent: AtomicU64::new(0),
            freed: freed.clone(),
            missed: Missed::default(),
        }),
        status: EngineStatus::default(),
    }
}

/// The single writer of [`Pools`].
struct Control {
    cfg: Config,
    tx: watch::Sender<Arc<Pools>>,
    outcomes: mpsc::Receiver<Outcome>,
    /// The only writer of outlier state.
    outliers: Outliers,
    tls: EngineTls,
    metrics: Arc<Metrics>,
    ratio_warned: bool,
    resolver: Arc<dyn Resolver>,
    /// Engine ids are never reused, so a record or a retry exclusion never names two engines.
    next_id: usize,
    /// When each pool's DNS name is next re-resolved (prefill, decode).
    dns_due: [Instant; 2],
    freed: Arc<Notify>,
}

impl Control {
    async fn run(mut self) {
        let interval = Duration::from_millis(self.cfg.health.interval_ms);
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut batch = Vec::with_capacity(256);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    self.discover().await;
                    self.outcomes_in(&[]);
                    self.round(None).await
                }
                n = self.outcomes.recv_many(&mut batch, 256) => {
                    if n == 0 {
                        return;
                    }
                    for s in self.outcomes_in(&batch) {
                        self.round(Some(s)).await;
                    }
                    batch.clear();
                }
            }
            if self.tx.is_closed() {
                return;
            }
        }
    }

    /// Count legs' outcomes (and failures that missed the queue); publish at once if an engine
    /// was ejected. Returns the engines to re-probe now, each once.
    fn outcomes_in(&mut self, batch: &[Outcome]) -> Vec<(PoolKind, usize)> {
        let now = Instant::now();
        let current = self.tx.borrow().clone();
        let mut ejected = self.outliers.drain_missed(&current, now, &self.metrics);
        let mut reprobe = Vec::new();
        for o in batch {
            ejected |= self.outliers.record(&current, o, now, &self.metrics);
            if o.reprobe && !reprobe.contains(&(o.pool, o.id)) {
                reprobe.push((o.pool, o.id));
            }
        }
        if ejected {
            let mut next = (*current).clone();
            self.outliers.settle(&mut next, |_, _| None, now);
            self.metrics.observe_pools(&next);
            let _ = self.tx.send(Arc::new(next));
        }
        reprobe
    }

    /// Probe every engine (or one suspect) and publish the result.
    async fn round(&mut self, only: Option<(PoolKind, usize)>) {
        let current = self.tx.borrow().clone();
        let now = Instant::now();
        let scrape_every = Duration::from_millis(self.cfg.health.scrape_interval_ms);
        let timeout = Duration::from_millis(self.cfg.health.timeout_ms);
        let targets: Vec<(PoolKind, EngineEntry)> = [PoolKind::Prefill, PoolKind::Decode]
            .into_iter()
            .flat_map(|k| current.pool(k).iter().map(move |e| (k, e.clone())))
            .filter(|(k, e)| only.is_none_or(|s| s == (*k, e.engine.id)))
            .collect();
        let probes = futures::future::join_all(targets.iter().map(|(_, e)| {
            let scrape = e
                .status
                .last_scrape
                .is_none_or(|t| now.duration_since(t) >= scrape_every);
            probe(e.engine.clone(), e.status.model.is_none(), scrape, timeout)
        }))
        .await;
        let results: HashMap<(PoolKind, usize), Probe> = targets
            .iter()
            .map(|(k, e)| (*k, e.engine.id))
            .zip(probes)
            .collect();
        let mut next = (*current).clone();
        for kind in [PoolKind::Prefill, PoolKind::Decode] {
            let pool = match kind {
                PoolKind::Prefill => &mut next.prefill,
                PoolKind::Decode => &mut next.decode,
            };
            for e in pool.iter_mut() {
                if let Some(p) = results.get(&(kind, e.engine.id)) {
                    apply(&self.cfg, &mut e.status, p, now);
                }
            }
        }
        if only.is_none() {
            next.probed = true;
        }
        self.outliers
            .settle(&mut next, |k, id| results.get(&(k, id)).map(|p| p.ok), now);
        self.metrics.observe_pools(&next);
        self.check_ratio(&next);
        let changed_health = health_summary(&current) != health_summary(&next);
        if changed_health {
            for e in next.prefill.iter().chain(next.decode.iter()) {
                tracing::info!(
                    engine = %e.engine.url,
                    pool = e.engine.pool.as_str(),
                    state = e.status.health.as_str(),
                    error = e.status.last_error.as_deref().unwrap_or(""),
                    "engine state"
                );
            }
        }
        let _ = self.tx.send(Arc::new(next));
        // Only now that the usage is published may the reservations it covers stop counting
        // (the other order would briefly count those blocks as free twice over).
        for (kind, e) in &targets {
            if let Some(s) = results
                .get(&(*kind, e.engine.id))
                .and_then(|p| p.scrape.as_ref())
            {
                e.engine.scrape_published(s.seq);
            }
        }
        self.freed.notify_waiters();
    }

    /// Re-resolve each pool's DNS name when due: new addresses become engines (probed before
    /// use), vanished ones drain (no new requests; removed once idle). A failed lookup changes
    /// nothing, so a DNS hiccup never empties a pool; an empty answer (no ready pods) drains all.
    async fn discover(&mut self) {
        let now = Instant::now();
        for (i, kind) in [PoolKind::Prefill, PoolKind::Decode]
            .into_iter()
            .enumerate()
        {
            let pool_cfg = pool_config(&self.cfg, kind);
            let Some(dns) = pool_cfg.dns.clone() else {
                continue;
            };
            if now < self.dns_due[i] {
                continue;
            }
            self.dns_due[i] = now + Duration::from_secs(dns.interval_secs);
            let answer = match self.resolver.resolve(&dns.name, dns.port).await {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(pool = kind.as_str(), name = %dns.name, error = %e, "DNS lookup failed; keeping the current engines");
                    continue;
                }
            };
            let urls: Vec<String> = answer
                .iter()
                .map(|a| format!("{}://{}", dns.scheme, a))
                .collect();
            let current = self.tx.borrow().clone();
            let mut next = (*current).clone();
            let connect = Duration::from_millis(self.cfg.timeouts.connect_ms);
            let pool = match kind {
                PoolKind::Prefill => &mut next.prefill,
                PoolKind::Decode => &mut next.decode,
            };
            let mut changed = false;
            for e in pool.iter_mut().filter(|e| e.engine.discovered) {
                let present = urls.iter().any(|u| **u == *e.engine.url);
                if !present && e.status.health != Health::Draining {
                    tracing::info!(pool = kind.as_str(), engine = %e.engine.url, "engine left DNS: draining");
                    e.status.health = Health::Draining;
                    changed = true;
                } else if present && e.status.health == Health::Draining {
                    e.status = EngineStatus::default();
                    changed = true;
                }
            }
            let before = pool.len();
            pool.retain(|e| {
                let gone = e.status.health == Health::Draining && e.engine.inflight() == 0;
                if gone {
                    e.engine.client.close_idle();
                }
                !gone
            });
            changed |= pool.len() != before;
            for u in &urls {
                if !pool.iter().any(|e| *e.engine.url == **u) {
                    tracing::info!(pool = kind.as_str(), engine = %u, "engine found in DNS");
                    let protocol = pool_config(&self.cfg, kind).protocol;
                    pool.push(new_entry(
                        self.next_id,
                        kind,
                        u,
                        (dns.weight, dns.group.as_deref().unwrap_or(DEFAULT_GROUP)),
                        true,
                        EngineClient::new(
                            protocol,
                            u,
                            metrics_url(u, dns.metrics_port).as_deref(),
                            connect,
                            &self.tls,
                        ),
                        &self.freed,
                    ));
                    self.next_id += 1;
                    changed = true;
                }
            }
            if changed {
                self.metrics.observe_pools(&next);
                let _ = self.tx.send(Arc::new(next));
            }
        }
    }

    fn check_ratio(&mut self, p: &Pools) {
        let Some(target) = self.cfg.pools.target_ratio else {
            return;
        };
        let (np, nd) = (p.healthy(PoolKind::Prefill), p.healthy(PoolKind::Decode));
        if nd == 0 || !p.probed {
            return;
        }
        let live = np as f64 / nd as f64;
        let drift = (live - target.value()).abs() / target.value();
        let drifted = drift > self.cfg.pools.ratio_tolerance;
        if drifted && !self.ratio_warned {
            tracing::warn!(
                live = format!("{np}:{nd}"),
                target = format!("{}:{}", target.prefill, target.decode),
                "live prefill:decode ratio has drifted from the configured target"
            );
        }
        self.ratio_warned = drifted;
    }
}

fn health_summary(p: &Pools) -> Vec<(usize, Health)> {
    p.prefill
        .iter()
        .chain(p.decode.iter())
        .map(|e| (e.engine.id, e.status.health))
        .collect()
}

fn apply(cfg: &Config, st: &mut EngineStatus, p: &Probe, now: Instant) {
    st.last_probe = Some(now);
    // A draining engine finishes what it has; probes never make it routable again.
    let draining = st.health == Health::Draining;
    if p.ok {
        st.successes += 1;
        st.failures = 0;
        st.last_error = None;
        if st.probed != Health::Healthy && st.successes >= cfg.health.healthy_after {
            st.probed = Health::Healthy;
        }
    } else {
        st.failures += 1;
        st.successes = 0;
        st.last_error = p.error.clone();
        if st.probed == Health::Unknown || st.failures >= cfg.health.unhealthy_after {
            st.probed = Health::Unhealthy;
        }
    }
    // Outlier detection may overlay `Ejected` before publishing (`Outliers::settle`).
    st.health = st.probed;
    if let Some(m) = &p.model {
        st.model = Some(m.clone());
    }
    st.block_size = p.block_size.or(st.block_size);
    st.num_gpu_blocks = p.num_gpu_blocks.or(st.num_gpu_blocks);
    if let Some(v) = &p.engine_version {
        st.engine_version = Some(v.clone());
    }
    if draining {
        st.health = Health::Draining;
    }
    if let Some(s) = &p.scrape {
        st.last_scrape = Some(now);
        st.block_size = s.block_size.or(st.block_size);
        st.num_gpu_blocks = s.num_gpu_blocks.or(st.num_gpu_blocks);
        st.kv_usage = s.kv_usage.or(st.kv_usage);
    }
}

/// A pool's configuration.
pub(crate) fn pool_config(cfg: &Config, pool: PoolKind) -> &tandem_config::PoolConfig {
    match pool {
        PoolKind::Prefill => &cfg.pools.prefill,
        PoolKind::Decode => &cfg.pools.decode,
    }
}

/// A discovered engine's metrics URL: its address with the pool's `dns.metrics_port`.
fn metrics_url(url: &str, port: Option<u16>) -> Option<String> {
    let port = port?;
    let (scheme, rest) = url.split_once("://")?;
    let host = rest.rsplit_once(':').map_or(rest, |(h, _)| h);
    let scheme = if scheme == "https" { "https" } else { "http" };
    Some(format!("{scheme}://{host}:{port}"))
}

async fn probe(engine: Arc<Engine>, want_model: bool, want_scrape: bool, t: Duration) -> Probe {
    // Numbered just before it is sent (see `Engine::scrape_sent`).
    let seq = want_scrape.then(|| engine.scrape_sent());
    engine.client.probe(seq, want_model, t).await
}

#[cfg(test)]
mod tests;
