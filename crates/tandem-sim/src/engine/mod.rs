//! The engine task: the one owner of the [`Scheduler`], driven by commands.
//!
//! It plans a step, sleeps the modeled step time (divided by the time scale), applies the step,
//! and fans tokens out to each request's channel. It also serves the prefill side of the NIXL side
//! channel (block reads, read notifications, lease expiry) and drives decode-side KV pulls, which
//! run as their own tasks (see [`transfer`]) and report back by command.
//!
//! Time: the simulated clock is `(tokio now - start) * time_scale`, so paused-time tests and
//! accelerated replays both work; every metric is observed in simulated seconds.

mod link;
mod output;
mod pinned;
mod reads;
mod transfer;
mod types;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::faults::Faults;
use crate::kv_events::KvEventPublisher;
use crate::metrics::{EngineMetrics, FinishedReason, FinishedRequest, SchedulerGauges};
use crate::sampler::{prompt_fingerprint, SampleVocab};
use crate::scheduler::{FinishReason, NewSeq, Scheduler, SeqId, StepPlan};
use crate::side_channel::SideRequest;
use crate::tokenizer::SimTokenizer;

pub use output::random_suffix;
use output::{decide, floor_char_boundary, wall_clock_secs, DetokState};
pub use transfer::{ParamNumbers, RemoteKv, TransferError};
pub use types::*;

enum Command {
    Submit(Box<Submit>, mpsc::UnboundedSender<Event>, Vec<SeqId>),
    Abort(Vec<SeqId>),
    Side(SideRequest),
    TransferDone(SeqId, Result<transfer::TransferStats, TransferError>),
    HostLoadDone(SeqId),
    ExhaustKv(bool),
    ResetPrefixCache(tokio::sync::oneshot::Sender<bool>),
}

/// A cheap handle to the engine task.
#[derive(Clone, Debug)]
pub struct EngineHandle {
    tx: mpsc::UnboundedSender<Command>,
    next_id: Arc<std::sync::atomic::AtomicU64>,
    clock: SimClock,
    overhead: Duration,
    serving: reads::ReadServing,
    /// The ids the sampler draws from (the HTTP layer draws logprob alternatives from them).
    sample_ids: Arc<[u32]>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Command")
    }
}

/// Simulated time.
#[derive(Clone, Copy, Debug)]
pub struct SimClock {
    start: Instant,
    scale: f64,
}

impl SimClock {
    pub fn new(scale: f64) -> Self {
        SimClock {
            start: Instant::now(),
            scale,
        }
    }

    /// Simulated seconds since start.
    pub fn now(&self) -> f64 {
        self.start.elapsed().as_secs_f64() * self.scale
    }

    /// Simulated time at a real instant.
    pub fn sim_of(&self, at: Instant) -> f64 {
        at.saturating_duration_since(self.start).as_secs_f64() * self.scale
    }

    /// Real time that a simulated duration takes.
    pub fn real(&self, sim: Duration) -> Duration {
        sim.div_f64(self.scale)
    }

    /// Simulated duration of a real one.
    pub fn real_to_sim(&self, real: Duration) -> f64 {
        real.as_secs_f64() * self.scale
    }

    /// The real instant at which simulated time `t` is reached.
    pub fn instant_at(&self, t: f64) -> Instant {
        self.start + Duration::from_secs_f64((t / self.scale).max(0.0))
    }
}

/// A request's stream of events. Dropping it aborts whatever is unfinished.
#[derive(Debug)]
pub struct RequestStream {
    pub rx: mpsc::UnboundedReceiver<Event>,
    ids: Vec<SeqId>,
    tx: mpsc::UnboundedSender<Command>,
}

impl Drop for RequestStream {
    fn drop(&mut self) {
        // Aborting finished sequences is a no-op in the engine, so always send.
        let _ = self.tx.send(Command::Abort(std::mem::take(&mut self.ids)));
    }
}

impl EngineHandle {
    /// Queue a request; its events arrive on the returned stream.
    pub fn submit(&self, req: Submit) -> RequestStream {
        let (tx, rx) = mpsc::unbounded_channel();
        let first = self
            .next_id
            .fetch_add(u64::from(req.n), std::sync::atomic::Ordering::Relaxed);
        let ids: Vec<SeqId> = (first..first + u64::from(req.n)).collect();
        // A closed engine drops the sender; the stream then ends and the caller reports it.
        let _ = self
            .tx
            .send(Command::Submit(Box::new(req), tx, ids.clone()));
        RequestStream {
            rx,
            ids,
            tx: self.tx.clone(),
        }
    }

    pub fn clock(&self) -> SimClock {
        self.clock
    }

    pub fn sample_ids(&self) -> Arc<[u32]> {
        self.sample_ids.clone()
    }

    /// The modeled per-request overhead (HTTP, tokenisation, scheduling), in real time.
    pub fn overhead(&self) -> Duration {
        self.clock.real(self.overhead)
    }

    pub fn set_exhaust_kv(&self, on: bool) {
        let _ = self.tx.send(Command::ExhaustKv(on));
    }

    pub async fn reset_prefix_cache(&self) -> bool {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.tx.send(Command::ResetPrefixCache(tx)).is_err() {
            return false;
        }
        rx.await.unwrap_or(false)
    }

    /// Serve the side-channel server's requests: reads of pinned KV beside the engine task (as
    /// one-sided NIXL READs are, see [`reads`]), notifications through it.
    pub fn serve_side(&self, rx: mpsc::Receiver<SideRequest>) {
        reads::serve(self.serving.clone(), rx, self.tx.clone());
    }
}

/// How far behind schedule the step loop may be and still catch up.
const CATCH_UP: Duration = Duration::from_millis(20);

struct SeqMeta {
    index: u32,
    out: mpsc::UnboundedSender<Event>,
    params: SeqParams,
    seed: u64,
    fingerprint: u64,
    prompt_len: usize,
    internal_id: String,
    remote: Option<RemoteKv>,
    force_eos_first: bool,
    n: u32,
    max_tokens_param: u64,
    text: String,
    detok: DetokState,
    cached_tokens: usize,
    /// Prompt tokens whose KV arrived from the prefill engine (decode role).
    pulled_tokens: usize,
    arrival: f64,
    first_scheduled: Option<f64>,
    first_token: Option<f64>,
    last_token: Option<f64>,
    generated: u64,
    /// Text length already sent, so a stop string can hold back text that might still match.
    sent_len: usize,
    stop_reason: Option<serde_json::Value>,
}

struct Pinned {
    seq: SeqId,
    deadline: f64,
}

/// Spawn the engine task.
pub fn spawn(
    cfg: EngineConfig,
    tokenizer: Arc<SimTokenizer>,
    metrics: Arc<EngineMetrics>,
    events: Option<KvEventPublisher>,
    faults: Faults,
) -> EngineHandle {
    let (tx, rx) = mpsc::unbounded_channel();
    let clock = SimClock::new(cfg.time_scale);
    // One NIC per engine: a decode engine's pulls share it inbound, a prefill engine's answered
    // reads outbound.
    let link = link::LinkHandle::spawn(cfg.cost.link_rate(cfg.link), clock);
    let host_link = link::LinkHandle::spawn(cfg.cost.host_link_rate(), clock);
    let reads = reads::PinnedReads::default();
    let vocab = crate::tokenizer::sample_vocab(&tokenizer, cfg.eos_ppm);
    let handle = EngineHandle {
        tx: tx.clone(),
        next_id: Arc::new(std::sync::atomic::AtomicU64::new(1)),
        clock,
        overhead: cfg.cost.per_request_overhead(),
        serving: reads::ReadServing {
            reads: reads.clone(),
            faults: faults.clone(),
            link: link.clone(),
            block_bytes: cfg.kv_bytes_per_token * u64::from(cfg.sched.block_size),
            nixl: cfg.nixl.clone(),
        },
        sample_ids: vocab.ids.clone(),
    };
    let sched = Scheduler::new(cfg.sched.clone());
    let engine = Engine {
        cfg: Arc::new(cfg),
        sched,
        tokenizer,
        vocab,
        metrics,
        events,
        faults,
        clock,
        meta: HashMap::new(),
        pinned: HashMap::new(),
        reads,
        link,
        host_link,
        agents: HashMap::new(),
        reserved: Vec::new(),
        tx,
    };
    // Apply start-up state before the ready line can be printed, so the first scrape sees it.
    let mut engine = engine;
    if engine.faults.exhaust_kv() {
        engine.set_exhaust(true);
    }
    engine.publish_gauges();
    tokio::spawn(engine.run(rx));
    handle
}

struct Engine {
    cfg: Arc<EngineConfig>,
    sched: Scheduler,
    tokenizer: Arc<SimTokenizer>,
    vocab: SampleVocab,
    metrics: Arc<EngineMetrics>,
    events: Option<KvEventPublisher>,
    faults: Faults,
    clock: SimClock,
    meta: HashMap<SeqId, SeqMeta>,
    /// Prefill role: pinned KV by internal request id.
    pinned: HashMap<String, Pinned>,
    /// Prefill role: the pinned blocks' contents, for reads served beside this task.
    reads: reads::PinnedReads,
    /// This engine's NIC, shared by its concurrent KV transfers.
    link: link::LinkHandle,
    /// Host memory to GPU (PCIe), shared by concurrent host-tier loads.
    host_link: link::LinkHandle,
    /// Decode role: remote engines already handshaken, by engine id.
    agents: HashMap<String, transfer::KnownAgent>,
    /// Blocks held by the `exhaust_kv` fault.
    reserved: Vec<u32>,
    tx: mpsc::UnboundedSender<Command>,
}

impl Engine {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Command>) {
        let mut busy_until: Option<Instant> = None;
        loop {
            // Take everything queued, then plan.
            while let Ok(cmd) = rx.try_recv() {
                self.handle(cmd);
            }
            self.expire_leases();
            let plan = self.sched.schedule();
            self.after_plan(&plan);
            if plan.is_empty() {
                busy_until = None;
                self.publish_gauges();
                let next_deadline = self
                    .pinned
                    .values()
                    .map(|p| p.deadline)
                    .fold(f64::INFINITY, f64::min);
                let cmd = if next_deadline.is_finite() {
                    tokio::select! {
                        c = rx.recv() => c,
                        _ = tokio::time::sleep_until(self.clock.instant_at(next_deadline)) => continue,
                    }
                } else {
                    rx.recv().await
                };
                match cmd {
                    Some(c) => self.handle(c),
                    None => return,
                }
                continue;
            }
            let dur = self.cfg.cost.step_time(&self.sched.shape(&plan));
            // Steps are laid end to end on a schedule rather than each sleeping from "now", so
            // timer granularity (about 1 ms, large against sub-millisecond scaled steps) does not
            // accumulate into the simulated clock. A loop that fell far behind starts afresh.
            let now = Instant::now();
            let begin = match busy_until {
                Some(t) if t + CATCH_UP >= now => t,
                _ => now,
            };
            let end = begin + self.clock.real(dur);
            tokio::time::sleep_until(end).await;
            busy_until = Some(end);
            // Commands that arrived during the step (aborts, reads) apply before its results.
            while let Ok(cmd) = rx.try_recv() {
                self.handle(cmd);
            }
            // Outputs are stamped with the step's scheduled end, not the (jittery) wake-up time.
            self.complete(&plan, self.clock.sim_of(end));
        }
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Submit(req, out, ids) => self.admit(*req, out, ids),
            Command::Abort(ids) => {
                for id in ids {
                    self.abort(id);
                }
            }
            Command::Side(req) => self.side(req),
            Command::TransferDone(id, result) => self.transfer_done(id, result),
            Command::HostLoadDone(id) => {
                self.sched.host_load_done(id);
                self.flush_events();
            }
            Command::ExhaustKv(on) => self.set_exhaust(on),
            Command::ResetPrefixCache(reply) => {
                let ok = self.sched.reset_prefix_cache();
                self.flush_events();
                let _ = reply.send(ok);
            }
        }
    }

    fn admit(&mut self, req: Submit, out: mpsc::UnboundedSender<Event>, ids: Vec<SeqId>) {
        let fingerprint = prompt_fingerprint(&req.prompt);
        let seed = req.params.seed.unwrap_or(self.cfg.seed);
        let (prefill, remote) = match &req.role {
            // Without a connector vLLM ignores the params and prefills locally.
            _ if self.cfg.no_kv_connector => (false, None),
            Role::Colocated => (false, None),
            Role::Prefill => (true, None),
            Role::Decode(r) => (false, Some(r.clone())),
        };
        self.metrics.prompt_tokens(req.prompt.len() as u64);
        for (index, id) in ids.into_iter().enumerate() {
            self.sched.add(NewSeq {
                id,
                prompt: req.prompt.clone(),
                max_tokens: req.params.max_tokens,
                remote_prefill: remote.is_some(),
                // Only the first choice's KV is handed off, as vLLM returns
                // `final_res_batch[0].kv_transfer_params`.
                remote_decode: prefill && index == 0,
            });
            self.meta.insert(
                id,
                SeqMeta {
                    index: index as u32,
                    out: out.clone(),
                    params: req.params.clone(),
                    seed,
                    fingerprint,
                    prompt_len: req.prompt.len(),
                    internal_id: req.internal_id.clone(),
                    remote: remote.clone(),
                    force_eos_first: req.force_eos_first,
                    n: req.n,
                    max_tokens_param: req.max_tokens_param,
                    text: String::new(),
                    detok: DetokState::default(),
                    cached_tokens: 0,
                    pulled_tokens: 0,
                    arrival: req.arrival,
                    first_scheduled: None,
                    first_token: None,
                    last_token: None,
                    generated: 0,
                    sent_len: 0,
                    stop_reason: None,
                },
            );
        }
    }

    fn abort(&mut self, id: SeqId) {
        if !self.sched.abort(id) {
            return;
        }
        if let Some(m) = self.meta.remove(&id) {
            // A decode-role request aborted before its KV arrived still tells the prefill engine
            // to free the blocks (vLLM enqueues an empty receive for the same reason).
            if let Some(remote) = &m.remote {
                let known = self.agents.get(&remote.engine_id).cloned();
                transfer::spawn_notify(
                    remote.clone(),
                    known,
                    self.cfg.clone(),
                    self.metrics.clone(),
                );
            }
            self.record_finished(&m, FinishReason::Abort);
        }
        self.flush_events();
    }

    fn after_plan(&mut self, plan: &StepPlan) {
        let now = self.clock.now();
        if plan.prefix_queries > 0 {
            self.metrics
                .prefix_cache(plan.prefix_queries, plan.prefix_hits);
        }
        if plan.external_queries > 0 {
            self.metrics
                .external_prefix_cache(plan.external_queries, plan.external_hits);
        }
        for id in &plan.first_scheduled {
            if let Some(m) = self.meta.get_mut(id) {
                m.first_scheduled.get_or_insert(now);
            }
        }
        if !plan.preempted.is_empty() {
            self.metrics.preempted(plan.preempted.len() as u64);
        }
        for s in &plan.scheduled {
            if s.start == 0 || !plan.first_scheduled.contains(&s.id) {
                continue;
            }
            if let Some(m) = self.meta.get_mut(&s.id) {
                if m.remote.is_none() {
                    m.cached_tokens = s.start;
                }
            }
        }
        for l in &plan.host_loads {
            let (link, tx, id) = (self.host_link.clone(), self.tx.clone(), l.id);
            let bytes = l.tokens as u64 * self.cfg.kv_bytes_per_token;
            tokio::spawn(async move {
                link.transfer(bytes).await;
                let _ = tx.send(Command::HostLoadDone(id));
            });
        }
        for t in &plan.transfers {
            let Some(m) = self.meta.get_mut(&t.id) else {
                continue;
            };
            m.first_scheduled.get_or_insert(now);
            m.cached_tokens = t.local_hit_blocks * self.cfg.sched.block_size as usize;
            let remote = m
                .remote
                .clone()
                .expect("transfers are for decode-role sequences");
            let expected = self
                .sched
                .expected_prompt_contents(t.id)
                .expect("sequence is in the scheduler");
            let known = self.agents.get(&remote.engine_id).cloned();
            let local_blocks = self
                .sched
                .blocks_of(t.id)
                .map(|b| b.iter().copied().take(expected.len()).collect())
                .unwrap_or_default();
            transfer::spawn_pull(
                transfer::Pull {
                    seq: t.id,
                    remote,
                    local_hit_blocks: t.local_hit_blocks,
                    local_blocks,
                    expected,
                    known,
                    prompt_len: m.prompt_len,
                },
                self.cfg.clone(),
                transfer::PullEdges {
                    clock: self.clock,
                    link: self.link.clone(),
                    metrics: self.metrics.clone(),
                },
                self.tx.clone(),
            );
        }
        self.flush_events();
    }

    fn complete(&mut self, plan: &StepPlan, now: f64) {
        self.metrics.iteration_tokens(plan.num_tokens() as u64);
        let Engine {
            sched,
            meta,
            tokenizer,
            vocab,
            ..
        } = self;
        let outputs = sched.complete(plan, &mut |id, tokens, prompt_len| {
            let m = meta
                .get_mut(&id)
                .expect("every scheduled sequence has metadata");
            decide(m, tokenizer, vocab, tokens, prompt_len)
        });
        for o in outputs {
            let Some(m) = self.meta.get_mut(&o.id) else {
                continue;
            };
            m.generated += 1;
            self.metrics.generation_tokens(1);
            match m.last_token {
                None => self.metrics.ttft(now - m.arrival),
                Some(prev) => self.metrics.itl(now - prev),
            }
            m.first_token.get_or_insert(now);
            m.last_token = Some(now);
            let finish = o.finished.as_ref().map(|f| f.reason);
            // Text held back for a possible stop string is released when the sequence ends.
            let visible = if finish.is_some() || m.params.stop.is_empty() {
                m.text.len()
            } else {
                let hold = m
                    .params
                    .stop
                    .iter()
                    .map(|s| s.len())
                    .max()
                    .unwrap_or(0)
                    .saturating_sub(1);
                floor_char_boundary(&m.text, m.text.len().saturating_sub(hold))
            };
            let delta = if visible > m.sent_len {
                m.text[m.sent_len..visible].to_string()
            } else {
                String::new()
            };
            m.sent_len = m.sent_len.max(visible);
            let Some(f) = o.finished else {
                let _ = m.out.send(Event::Token {
                    index: m.index,
                    token: o.token,
                    text: delta,
                    finish: None,
                });
                continue;
            };
            let m = self.meta.remove(&o.id).expect("present above");
            let kv = f.pinned_blocks.map(|block_ids| {
                let deadline = now + self.cfg.abort_timeout.as_secs_f64();
                let contents: HashMap<u32, [u8; 32]> = block_ids
                    .iter()
                    .map(|&b| (b, self.sched.block_content(b).unwrap_or([0; 32])))
                    .collect();
                if let Some(n) = &self.cfg.nixl {
                    // Into the registered region before the params leave this engine, so the
                    // decode side's one-sided READ finds them.
                    n.write_blocks(contents.iter().map(|(&b, &c)| (b, c)).collect());
                }
                self.reads.pin(&m.internal_id, contents);
                self.pinned.insert(
                    m.internal_id.clone(),
                    Pinned {
                        seq: o.id,
                        deadline,
                    },
                );
                KvHandle {
                    block_ids,
                    remote_request_id: m.internal_id.clone(),
                    num_tokens: m.prompt_len,
                }
            });
            self.record_finished(&m, f.reason);
            let pinned = kv.is_some();
            let event = Event::Token {
                index: m.index,
                token: o.token,
                text: delta,
                finish: Some(Finish {
                    reason: f.reason,
                    stop_reason: m.stop_reason.clone(),
                    kv,
                    cached_tokens: m.cached_tokens,
                }),
            };
            match &self.cfg.nixl {
                // A one-sided READ may come as soon as the params are out: they leave only once
                // the blocks' bytes are in the registered region (vLLM's KV is computed by then).
                Some(n) if pinned => {
                    let (n, out) = (n.clone(), m.out.clone());
                    tokio::spawn(async move {
                        n.barrier().await;
                        let _ = out.send(event);
                    });
                }
                _ => {
                    let _ = m.out.send(event);
                }
            }
        }
        self.flush_events();
        self.publish_gauges();
    }

    fn record_finished(&self, m: &SeqMeta, reason: FinishReason) {
        let now = self.clock.now();
        let sched = m.first_scheduled.unwrap_or(now);
        let first = m.first_token.unwrap_or(now);
        let mean_tpot = (m.generated > 1)
            .then(|| (m.last_token.unwrap_or(now) - first) / (m.generated - 1) as f64);
        self.metrics.request_finished(&FinishedRequest {
            reason: match reason {
                FinishReason::Stop => FinishedReason::Stop,
                FinishReason::Length => FinishedReason::Length,
                FinishReason::Abort => FinishedReason::Abort,
                FinishReason::Error => FinishedReason::Error,
            },
            prompt_tokens: m.prompt_len as u64,
            generation_tokens: m.generated,
            max_tokens_param: m.max_tokens_param,
            n: m.n,
            e2e_s: now - m.arrival,
            queue_s: sched - m.arrival,
            prefill_s: first - sched,
            decode_s: now - first,
            inference_s: now - sched,
            prefill_kv_computed_tokens: m
                .prompt_len
                .saturating_sub(m.cached_tokens + m.pulled_tokens)
                as u64,
            mean_tpot_s: mean_tpot,
        });
    }

    fn flush_events(&mut self) {
        let events = self.sched.take_events();
        if let Some(p) = &self.events {
            p.publish(wall_clock_secs(), events);
        }
    }

    fn publish_gauges(&self) {
        let (capacity, deferred) = self.sched.num_waiting();
        self.metrics.set_scheduler(SchedulerGauges {
            running: self.sched.num_running() as u64,
            waiting_capacity: capacity as u64,
            waiting_deferred: deferred as u64,
            kv_cache_usage: self.sched.kv_usage(),
        });
    }

    fn set_exhaust(&mut self, on: bool) {
        if on {
            let got = self.sched.reserve_blocks(usize::MAX);
            self.reserved.extend(got);
        } else {
            let blocks = std::mem::take(&mut self.reserved);
            self.sched.unreserve_blocks(&blocks);
        }
        self.flush_events();
        self.publish_gauges();
    }

    fn transfer_done(&mut self, id: SeqId, result: Result<transfer::TransferStats, TransferError>) {
        if !self.sched.contains(id) {
            return; // aborted meanwhile
        }
        match result {
            Ok(stats) => {
                if let Some(agent) = stats.handshake {
                    if let Some(m) = self.meta.get(&id) {
                        if let Some(r) = &m.remote {
                            self.agents.insert(r.engine_id.clone(), agent);
                        }
                    }
                }
                self.metrics.nixl_transfer(
                    stats.xfer_s,
                    stats.post_s,
                    stats.bytes,
                    stats.descriptors,
                );
                if self.sched.remote_kv_done(id) {
                    if let Some(m) = self.meta.get_mut(&id) {
                        // vLLM recomputes the last prompt token on the decode side.
                        m.pulled_tokens = m.prompt_len.saturating_sub(m.cached_tokens + 1);
                    }
                }
            }
            Err(e) => {
                self.metrics.nixl_failed_transfer();
                tracing::warn!(seq = id, error = %e, "KV load failed");
                match self.cfg.kv_load_failure_policy {
                    KvLoadFailurePolicy::Recompute => {
                        self.sched.remote_kv_recompute(id);
                        if let Some(m) = self.meta.get_mut(&id) {
                            m.cached_tokens = 0;
                        }
                    }
                    KvLoadFailurePolicy::Fail => {
                        self.sched.abort(id);
                        if let Some(m) = self.meta.remove(&id) {
                            self.record_finished(&m, FinishReason::Error);
                            let _ = m.out.send(Event::Failed {
                                index: m.index,
                                error: e.to_string(),
                            });
                        }
                    }
                }
            }
        }
        self.flush_events();
        self.publish_gauges();
    }
}

#[cfg(test)]
mod tests;
