//! Per-request timing: the marks that split TTFT into phases, and the record every request
//! leaves behind (in metrics and in the bounded recent-requests buffer behind
//! `GET /admin/requests`).
//!
//! The phases are differences of consecutive marks on one monotonic clock, so they add up to
//! TTFT exactly: queue = arrival → first leg dispatched; prefill = → KV params parsed; handoff =
//! → decode leg dispatched; decode_first_token = → first content byte handed to the client.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;

use crate::metrics::{DisaggLabels, Metrics, PhaseLabels, RequestLabels, TtftLabels};
use crate::trace::Outgoing;

/// What one request left behind.
#[derive(Debug, Clone, Serialize)]
pub struct RequestRecord {
    pub request_id: String,
    /// The W3C trace this request belongs to, and Tandem's span in it (the parent the engines saw).
    pub trace_id: String,
    pub span_id: String,
    pub route: &'static str,
    pub outcome: &'static str,
    pub decision_reason: &'static str,
    pub prefill_engine: Option<String>,
    pub decode_engine: Option<String>,
    /// The engine group both legs ran in (`None`: refused before one was chosen).
    pub group: Option<String>,
    pub prefill_attempts: u32,
    pub decode_attempts: u32,
    pub prompt_tokens: u64,
    pub cached_tokens: Option<u64>,
    /// What the prefill pool's prefix index predicted the chosen prefill engine held.
    pub predicted_cached_tokens: Option<u64>,
    pub content_chunks: u64,
    pub itl_observations: u64,
    pub queue_s: Option<f64>,
    pub prefill_s: Option<f64>,
    pub handoff_s: Option<f64>,
    pub decode_first_token_s: Option<f64>,
    pub ttft_s: Option<f64>,
    pub e2e_s: f64,
    /// Prefill params parsed to decode leg dispatched.
    pub dispatch_gap_s: Option<f64>,
}

/// The last N records.
#[derive(Debug)]
pub struct Recent {
    cap: usize,
    buf: Mutex<VecDeque<RequestRecord>>,
}

impl Recent {
    pub fn new(cap: usize) -> Self {
        Recent {
            cap,
            buf: Mutex::new(VecDeque::with_capacity(cap.min(4096))),
        }
    }

    fn push(&self, r: RequestRecord) {
        if self.cap == 0 {
            return;
        }
        let mut b = self.buf.lock().expect("recent lock");
        if b.len() == self.cap {
            b.pop_front();
        }
        b.push_back(r);
    }

    pub fn list(&self) -> Vec<RequestRecord> {
        self.buf
            .lock()
            .expect("recent lock")
            .iter()
            .cloned()
            .collect()
    }
}

/// Accumulates one request's marks and, when dropped, records it. A request whose future or
/// stream is dropped before it finished (the client went away) is recorded as
/// `client_disconnect`. Each mark is also an event on the request's span, and the span lives as
/// long as the Finisher, so an exported span covers the whole request.
#[derive(Debug)]
pub struct Finisher {
    metrics: Arc<Metrics>,
    recent: Arc<Recent>,
    pub model: String,
    pub request_id: String,
    pub span: tracing::Span,
    /// The trace headers every engine leg carries.
    pub trace: Outgoing,
    arrival: Instant,
    dispatched: Option<Instant>,
    params: Option<Instant>,
    decode_dispatch: Option<Instant>,
    first_content: Option<Instant>,
    last_content: Option<Instant>,
    content_chunks: u64,
    itl_observations: u64,
    dispatch_gap: Option<f64>,
    pub disaggregated: bool,
    pub decision: Option<(&'static str, &'static str)>,
    pub prefill_engine: Option<String>,
    pub decode_engine: Option<String>,
    /// The request's engine group, once chosen (`split.rs`).
    pub group: Option<Arc<str>>,
    pub prefill_attempts: u32,
    pub decode_attempts: u32,
    pub prompt_tokens: u64,
    pub cached_tokens: Option<u64>,
    pub predicted_cached_tokens: Option<u64>,
    outcome: Option<&'static str>,
    /// Records nothing when dropped (a prompt list, whose prompts record themselves).
    silent: bool,
    /// The tenant's budget this request counts against (`[auth]` on), with what it has taken.
    budget: Option<Budget>,
}

/// What one request took from its tenant's token budget: its prompt at admission, one token
/// per content chunk as they go out, and, at the end, the difference to the answer's usage.
#[derive(Debug)]
struct Budget {
    permit: crate::limits::Permit,
    taken: u64,
    usage: Option<(u64, u64)>,
}

fn secs(a: Instant, b: Instant) -> f64 {
    b.saturating_duration_since(a).as_secs_f64()
}

impl Finisher {
    pub fn new(
        metrics: Arc<Metrics>,
        recent: Arc<Recent>,
        request_id: String,
        span: tracing::Span,
        trace: Outgoing,
    ) -> Self {
        Finisher {
            metrics,
            recent,
            model: String::new(),
            request_id,
            span,
            trace,
            arrival: Instant::now(),
            dispatched: None,
            params: None,
            decode_dispatch: None,
            first_content: None,
            last_content: None,
            content_chunks: 0,
            itl_observations: 0,
            dispatch_gap: None,
            disaggregated: false,
            decision: None,
            prefill_engine: None,
            decode_engine: None,
            group: None,
            prefill_attempts: 0,
            decode_attempts: 0,
            prompt_tokens: 0,
            cached_tokens: None,
            predicted_cached_tokens: None,
            outcome: None,
            silent: false,
            budget: None,
        }
    }

    /// Count this request against `permit`, which has taken `prompt` tokens already.
    pub(crate) fn set_permit(&mut self, permit: crate::limits::Permit, prompt: u64) {
        self.budget = Some(Budget {
            permit,
            taken: prompt,
            usage: None,
        });
    }

    /// The request's permit (a prompt list hands it to its prompts, which charge their own).
    pub(crate) fn take_permit(&mut self) -> Option<crate::limits::Permit> {
        self.budget.take().map(|b| b.permit)
    }

    /// An event or a whole answer going to the client: its usage, if it has one, settles the
    /// budget at the end (only read when a budget is kept).
    /// A token budget settles on the stream's usage, so the relay looks for it.
    pub fn wants_usage(&self) -> bool {
        self.budget.is_some()
    }

    /// The usage a stream event carried.
    pub fn saw_usage(&mut self, u: (u64, u64)) {
        if let Some(b) = &mut self.budget {
            b.usage = Some(u);
        }
    }

    pub fn saw(&mut self, bytes: &[u8]) {
        if let Some(b) = &mut self.budget {
            if let Some(u) = crate::relay::usage_of(bytes) {
                b.usage = Some(u);
            }
        }
    }

    /// Leave no record: the request is recorded by the parts it was split into.
    pub fn silence(&mut self) {
        self.silent = true;
    }

    /// An upstream leg (prefill, or a local decode) is about to be sent. Only the first counts.
    pub fn mark_dispatch(&mut self) {
        if self.dispatched.is_none() {
            self.dispatched = Some(Instant::now());
            tracing::debug!(parent: &self.span, phase = "queue", "first leg dispatched");
        }
    }

    /// The prefill's KV params (or its null answer) are parsed. A later re-plan moves it.
    pub fn mark_params(&mut self) {
        self.params = Some(Instant::now());
        self.decode_dispatch = None;
        tracing::debug!(parent: &self.span, phase = "prefill", cached_tokens = self.cached_tokens, "prefill leg answered");
    }

    /// The decode leg is about to be sent. Only the first after the params counts; decode
    /// retries fall in the decode_first_token phase.
    pub fn mark_decode_dispatch(&mut self) {
        if self.decode_dispatch.is_none() {
            let now = Instant::now();
            self.dispatched.get_or_insert(now);
            self.decode_dispatch = Some(now);
            if let (true, Some(p)) = (self.disaggregated, self.params) {
                let gap = secs(p, now);
                self.dispatch_gap = Some(gap);
                if self.metrics.enabled() {
                    self.metrics.dispatch_gap.observe(gap);
                }
            }
            tracing::debug!(parent: &self.span, phase = "handoff", decode_engine = self.decode_engine.as_deref(), "decode leg dispatched");
        }
    }

    /// A content chunk is being handed to the client.
    pub fn mark_content(&mut self) {
        self.mark_content_at(Instant::now());
    }

    /// `n` content chunks that arrived together are being handed over in one write (one clock
    /// read; the ITL between them is what the client sees, zero).
    pub fn mark_contents(&mut self, n: u32) {
        if n > 0 {
            let now = Instant::now();
            for _ in 0..n {
                self.mark_content_at(now);
            }
        }
    }

    fn mark_content_at(&mut self, now: Instant) {
        if let Some(prev) = self.last_content {
            if self.metrics.enabled() {
                self.metrics.itl.observe(secs(prev, now));
            }
            self.itl_observations += 1;
        } else {
            self.first_content = Some(now);
            tracing::debug!(parent: &self.span, phase = "decode_first_token", "first content byte to the client");
            // As vLLM does: TTFT is observed when the first token goes out, so a scrape during
            // a long stream already sees it.
            if self.metrics.enabled() {
                self.observe_first_byte();
            }
        }
        self.last_content = Some(now);
        self.content_chunks += 1;
        if let Some(b) = &mut self.budget {
            // One chunk is one token as vLLM streams; usage corrects it at the end.
            b.permit.charge(1);
            b.taken += 1;
        }
    }

    pub fn finish(&mut self, outcome: &'static str) {
        self.outcome.get_or_insert(outcome);
    }

    fn route(&self) -> &'static str {
        if self.disaggregated {
            "disaggregated"
        } else {
            "local"
        }
    }

    /// (queue, prefill, handoff, decode_first_token), once the first content byte went out.
    fn phases(&self) -> Option<(f64, f64, f64, f64)> {
        match (self.dispatched, self.decode_dispatch, self.first_content) {
            (Some(d), Some(dd), Some(fc)) => {
                // A request without a prefill leg has no prefill phase: its "params" moment is
                // its dispatch.
                let p = self.params.unwrap_or(d);
                Some((secs(self.arrival, d), secs(d, p), secs(p, dd), secs(dd, fc)))
            }
            _ => None,
        }
    }

    /// TTFT and its phases, observed at the first content byte.
    fn observe_first_byte(&self) {
        let m = &self.metrics;
        if let Some(fc) = self.first_content {
            m.ttft
                .get_or_create(&TtftLabels {
                    route: self.route(),
                    model: self.model.clone(),
                    group: self.group.as_deref().unwrap_or_default().to_owned(),
                })
                .observe(secs(self.arrival, fc));
        }
        if let Some((q, p, h, d)) = self.phases() {
            for (phase, v) in [
                ("queue", q),
                ("prefill", p),
                ("handoff", h),
                ("decode_first_token", d),
            ] {
                m.phase.get_or_create(&PhaseLabels { phase }).observe(v);
            }
        }
    }

    fn record(&self, outcome: &'static str) -> RequestRecord {
        let end = Instant::now();
        let ttft = self.first_content.map(|t| secs(self.arrival, t));
        let phases = self.phases();
        RequestRecord {
            request_id: self.request_id.clone(),
            trace_id: self.trace.context.trace_id_hex(),
            span_id: self.trace.context.parent_id_hex(),
            route: self.route(),
            outcome,
            decision_reason: self.decision.map_or("none", |d| d.1),
            prefill_engine: self.prefill_engine.clone(),
            decode_engine: self.decode_engine.clone(),
            group: self.group.as_deref().map(str::to_owned),
            prefill_attempts: self.prefill_attempts,
            decode_attempts: self.decode_attempts,
            prompt_tokens: self.prompt_tokens,
            cached_tokens: self.cached_tokens,
            predicted_cached_tokens: self.predicted_cached_tokens,
            content_chunks: self.content_chunks,
            itl_observations: self.itl_observations,
            queue_s: phases.map(|p| p.0),
            prefill_s: phases.map(|p| p.1),
            handoff_s: phases.map(|p| p.2),
            decode_first_token_s: phases.map(|p| p.3),
            ttft_s: ttft,
            e2e_s: secs(self.arrival, end),
            dispatch_gap_s: self.dispatch_gap,
        }
    }

    /// The request's metric observations at its end (only when metrics are on).
    fn observe(&self, rec: &RequestRecord) {
        let m = &self.metrics;
        let outcome = rec.outcome;
        m.requests
            .get_or_create(&RequestLabels {
                route: rec.route,
                outcome,
                group: rec.group.clone().unwrap_or_default(),
            })
            .inc();
        if let Some((decision, reason)) = self.decision {
            m.disagg_decisions
                .get_or_create(&DisaggLabels { decision, reason })
                .inc();
        }
        // TTFT and its phases were observed at the first content byte.
        if let (Some(f), Some(l)) = (self.first_content, self.last_content) {
            if self.content_chunks > 1 {
                m.tpot
                    .observe(secs(f, l) / (self.content_chunks - 1) as f64);
            }
        }
        m.e2e.observe(rec.e2e_s);
        if let Some(c) = self.cached_tokens {
            m.reported_cached_tokens.inc_by(c);
            // Only where the engine reported: the two counters then compare like with like.
            if let Some(p) = self.predicted_cached_tokens {
                m.predicted_cached_tokens.inc_by(p);
            }
        }
    }
}

impl Drop for Finisher {
    fn drop(&mut self) {
        if let Some(Budget {
            permit,
            taken,
            usage: Some((prompt, completion)),
        }) = &self.budget
        {
            permit.charge((prompt + completion) as i64 - *taken as i64);
        }
        if self.silent {
            return;
        }
        let outcome = self.outcome.unwrap_or("client_disconnect");
        let rec = self.record(outcome);
        if self.metrics.enabled() {
            self.observe(&rec);
        }
        // The plan and the result on the span (an exported span's attributes), and one access-log
        // line per request.
        let span = &self.span;
        span.record("route", rec.route);
        span.record("decision_reason", rec.decision_reason);
        if let Some(p) = &rec.prefill_engine {
            span.record("prefill_engine", p.as_str());
        }
        if let Some(d) = &rec.decode_engine {
            span.record("decode_engine", d.as_str());
        }
        span.record("outcome", outcome);
        tracing::info!(
            parent: span,
            request_id = %rec.request_id,
            trace_id = %rec.trace_id,
            route = rec.route,
            outcome,
            reason = rec.decision_reason,
            prefill_engine = rec.prefill_engine.as_deref(),
            decode_engine = rec.decode_engine.as_deref(),
            prompt_tokens = rec.prompt_tokens,
            cached_tokens = rec.cached_tokens,
            queue_s = rec.queue_s,
            prefill_s = rec.prefill_s,
            handoff_s = rec.handoff_s,
            decode_first_token_s = rec.decode_first_token_s,
            ttft_s = rec.ttft_s,
            e2e_s = rec.e2e_s,
            chunks = rec.content_chunks,
            "request finished"
        );
        self.recent.push(rec);
    }
}
