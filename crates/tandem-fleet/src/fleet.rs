//! The discrete-event loop: engines, links, the coordinator and the trace's requests.
//!
//! A request's life, disaggregated (times as the real system has them):
//!
//! ```text
//! arrival ─ plan (prefix policy) ─ +c_req ─ prefill engine queue ─ steps ─ answer (KV pinned)
//!   ─ handoff (kv-capacity, reservations) ─ +c_req ─ decode engine: prefix lookup, blocks
//!   ─ pull over both NICs (shared) + c_xfer ─ notify (prefill frees its pin)
//!   ─ next step computes the last prompt token: first token ─ one token per step ─ done
//! ```
//!
//! `c_req` is the profile's per-request overhead, which the sim's HTTP layer sleeps before it
//! submits each leg. Engines follow the sim's engine task (`tandem-sim/src/engine/mod.rs`): a
//! step is planned when the engine is idle and work arrives, or as soon as the last one ends; it
//! lasts the cost model's step time; its tokens are stamped with its end.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use tandem_policy::{DisaggDecision, DisaggMode};
use tandem_sim::cost::CostModel;
use tandem_sim::kv_cache::none_hash;
use tandem_sim::scheduler::{NewSeq, Scheduler, SchedulerConfig, SeqId, StepOutput, StepPlan};
use tandem_workload::{Outcome, Summary, Synthesizer, Trace};

use crate::coord::{Coord, Routing};
use crate::links::Links;
use crate::queue::Queue;
use crate::{FleetConfig, FleetError, FleetReport, FleetStats};

/// The token every simulated output position samples: outputs are never part of a later prompt
/// in a trace replay, so their values do not matter, only their count.
const OUTPUT_TOKEN: u32 = 7;

#[derive(Debug, Clone, Copy)]
enum Leg {
    Prefill {
        req: usize,
    },
    /// Pulls its prompt's KV from engine `from` (sequence `from_seq` pinned there).
    Decode {
        req: usize,
        from: usize,
        from_seq: SeqId,
    },
    Local {
        req: usize,
    },
}

#[derive(Debug, Clone, Copy)]
enum Tag {
    Pull {
        eng: usize,
        seq: SeqId,
        from: usize,
        from_seq: SeqId,
        fixed: bool,
    },
    HostLoad {
        eng: usize,
        seq: SeqId,
    },
}

#[derive(Debug)]
enum Ev {
    Arrival(usize),
    Submit { eng: usize, req: usize, leg: Leg },
    Kick(usize),
    StepEnd(usize),
    LinkCheck { link: usize, version: u64 },
    PullDone(Tag),
    Scrape,
}

#[derive(Debug)]
struct Eng {
    decode_pool: bool,
    /// Index within its pool.
    pool_idx: usize,
    sched: Scheduler,
    cost: CostModel,
    kv_bytes_per_token: u64,
    block_size: usize,
    nic: usize,
    pcie: usize,
    c_xfer: f64,
    c_req: f64,
    plan: Option<StepPlan>,
    kick: bool,
    legs: HashMap<SeqId, Leg>,
    next_seq: SeqId,
}

#[derive(Debug, Default)]
struct Req {
    arrival: f64,
    prompt: Option<Arc<[u32]>>,
    routing: Option<Routing>,
    output: u32,
    prompt_len: u32,
    /// Prefill pool index and the predicted uncached work sent with it.
    prefill: Option<(usize, u64)>,
    decode: Option<usize>,
    cached: u64,
    dispatched: Option<f64>,
    answered: Option<f64>,
    decode_sent: Option<f64>,
    first: Option<f64>,
    last: f64,
    itl: Vec<f64>,
    tokens: u32,
    done: bool,
    missed: bool,
}

#[derive(Debug, Clone, Copy)]
enum Stage {
    Arrival,
    Handoff {
        from: usize,
        from_seq: Option<SeqId>,
    },
}

struct Fleet<'a> {
    cfg: &'a FleetConfig,
    trace: &'a Trace,
    synth: &'a Synthesizer,
    engines: Vec<Eng>,
    links: Links<Tag>,
    coord: Coord,
    q: Queue<Ev>,
    reqs: Vec<Req>,
    held: VecDeque<(usize, Stage)>,
    finished: usize,
    stats: FleetStats,
    end: f64,
}

/// Simulate `trace` (prompts from `synth`, as `tandem bench trace` sends them) on the fleet.
pub fn run(
    cfg: &FleetConfig,
    trace: &Trace,
    synth: &Synthesizer,
) -> Result<FleetReport, FleetError> {
    validate(cfg)?;
    let mut f = Fleet::new(cfg, trace, synth);
    for (i, r) in trace.requests.iter().enumerate() {
        f.q.push(r.at_ms / 1000.0, Ev::Arrival(i));
    }
    if !trace.requests.is_empty() {
        f.q.push(0.0, Ev::Scrape);
    }
    while let Some((t, ev)) = f.q.pop() {
        f.stats.events += 1;
        f.handle(t, ev);
        if cfg
            .stop_after_misses
            .is_some_and(|m| f.stats.misses > m as u64)
        {
            f.stats.stopped_early = true;
            break;
        }
    }
    Ok(f.report())
}

fn validate(cfg: &FleetConfig) -> Result<(), FleetError> {
    if cfg.decode.is_empty() {
        return Err(FleetError::NoDecodeEngine);
    }
    if cfg.prefill.is_empty() && cfg.disagg.mode == DisaggMode::Always {
        return Err(FleetError::NoPrefillEngine);
    }
    if !(cfg.coordinator_scale > 0.0 && cfg.coordinator_scale.is_finite()) {
        return Err(FleetError::NotPositive("coordinator_scale"));
    }
    if !(cfg.scrape_interval_s > 0.0 && cfg.scrape_interval_s.is_finite()) {
        return Err(FleetError::NotPositive("scrape_interval_s"));
    }
    let bs = cfg.decode[0].block_size;
    for (i, e) in cfg.prefill.iter().chain(&cfg.decode).enumerate() {
        if e.block_size != bs {
            return Err(FleetError::MixedBlockSize);
        }
        if e.gpu_blocks() == 0 || e.block_size == 0 || e.max_num_seqs == 0 {
            return Err(FleetError::NoKvBlocks(format!(
                "#{i} ({})",
                e.profile.model.name
            )));
        }
    }
    Ok(())
}

impl<'a> Fleet<'a> {
    fn new(cfg: &'a FleetConfig, trace: &'a Trace, synth: &'a Synthesizer) -> Self {
        let mut links = Links::new();
        let mut engines = Vec::new();
        let pools = [(false, &cfg.prefill), (true, &cfg.decode)];
        for (decode_pool, pool) in pools {
            for (i, e) in pool.iter().enumerate() {
                let cost = CostModel::new(e.profile.clone());
                let nic = links.add(cost.link_rate(e.link));
                let pcie = links.add(cost.host_link_rate());
                // Distinct roots per engine, as separate vLLM processes have (`PYTHONHASHSEED`).
                let root = none_hash(&format!("fleet-{}-{i}", u8::from(decode_pool)));
                engines.push(Eng {
                    decode_pool,
                    pool_idx: i,
                    sched: Scheduler::new(SchedulerConfig {
                        max_num_seqs: e.max_num_seqs,
                        max_num_batched_tokens: e.max_num_batched_tokens,
                        block_size: e.block_size,
                        num_gpu_blocks: e.gpu_blocks(),
                        root_hash: root,
                        enable_prefix_caching: e.enable_prefix_caching,
                        num_host_blocks: e.host_blocks(),
                        // No KV bytes move in virtual time: nothing reads block contents.
                        kv_content: false,
                    }),
                    kv_bytes_per_token: e.profile.kv_bytes_per_token(),
                    block_size: e.block_size as usize,
                    nic,
                    pcie,
                    c_xfer: e.link.c_xfer().as_secs_f64(),
                    c_req: cost.per_request_overhead().as_secs_f64(),
                    cost,
                    plan: None,
                    kick: false,
                    legs: HashMap::new(),
                    next_seq: 1,
                });
            }
        }
        Fleet {
            cfg,
            trace,
            synth,
            engines,
            links,
            coord: Coord::new(cfg),
            q: Queue::new(),
            reqs: (0..trace.requests.len()).map(|_| Req::default()).collect(),
            held: VecDeque::new(),
            finished: 0,
            stats: FleetStats::default(),
            end: 0.0,
        }
    }

    fn decode_eng(&self, d: usize) -> usize {
        self.cfg.prefill.len() + d
    }

    fn handle(&mut self, t: f64, ev: Ev) {
        match ev {
            Ev::Arrival(i) => self.arrive(t, i),
            Ev::Submit { eng, req, leg } => self.submit(t, eng, req, leg),
            Ev::Kick(e) => {
                self.engines[e].kick = false;
                if self.engines[e].plan.is_none() {
                    self.step(t, e);
                }
            }
            Ev::StepEnd(e) => self.step_end(t, e),
            Ev::LinkCheck { link, version } => {
                if let Some(done) = self.links.check(t, link, version) {
                    for tag in done {
                        self.landed(t, tag);
                    }
                    self.watch_link(link);
                }
            }
            Ev::PullDone(tag) => self.pull_done(t, tag),
            Ev::Scrape => self.scrape(t),
        }
    }

    fn arrive(&mut self, t: f64, i: usize) {
        let r = &self.trace.requests[i];
        let prompt: Arc<[u32]> = self.synth.tokens(r).into();
        let output = r.output_tokens.max(1);
        let routing = self.coord.routing(t, &prompt, u64::from(output));
        let req = &mut self.reqs[i];
        req.arrival = t;
        req.prompt_len = prompt.len() as u32;
        req.output = output;
        req.prompt = Some(prompt);
        req.routing = Some(routing);
        if !self.place(t, i) {
            self.stats.held += 1;
            self.held.push_back((i, Stage::Arrival));
        }
    }

    /// Plan and dispatch an arrived request; false when it must wait.
    fn place(&mut self, t: f64, i: usize) -> bool {
        let routing = self.reqs[i].routing.take().expect("routing until placed");
        let planned = self.coord.plan(&routing, i);
        let ok = match planned {
            Err(_) => false,
            Ok(plan) => {
                self.reqs[i].dispatched = Some(t);
                match (plan.decision, plan.prefill) {
                    (DisaggDecision::Disaggregate, Some(p)) => {
                        self.stats.disaggregated += 1;
                        let predicted = routing
                            .prefill_cached
                            .iter()
                            .find(|(e, _)| *e == p.id)
                            .map_or(0, |&(_, t)| t);
                        let work = routing.prompt_tokens.saturating_sub(predicted);
                        self.coord.prefill_sent(t, p.id, work, &routing.keys);
                        self.reqs[i].prefill = Some((p.id, work));
                        let at = t + self.engines[p.id].c_req + self.cfg.leg_overhead_s;
                        self.q.push(
                            at,
                            Ev::Submit {
                                eng: p.id,
                                req: i,
                                leg: Leg::Prefill { req: i },
                            },
                        );
                    }
                    _ => {
                        self.stats.local += 1;
                        let d = plan.decode.id;
                        self.coord.decode_routed(t, d, &routing.keys);
                        self.reqs[i].decode = Some(d);
                        let e = self.decode_eng(d);
                        self.reqs[i].decode_sent = Some(t);
                        let at = t + self.engines[e].c_req + self.cfg.leg_overhead_s;
                        self.q.push(
                            at,
                            Ev::Submit {
                                eng: e,
                                req: i,
                                leg: Leg::Local { req: i },
                            },
                        );
                    }
                }
                true
            }
        };
        self.reqs[i].routing = Some(routing);
        ok
    }

    /// Place a request whose prefill answered: a decode engine now, or wait.
    fn handoff(&mut self, t: f64, i: usize, from: usize, from_seq: Option<SeqId>) -> bool {
        let routing = self.reqs[i].routing.take().expect("routing until done");
        let p = self.engines[from].pool_idx;
        let picked = self.coord.handoff(&routing, i, p);
        if let Some(d) = picked {
            self.coord.decode_routed(t, d, &routing.keys);
            self.reqs[i].decode = Some(d);
            self.reqs[i].decode_sent = Some(t);
            let e = self.decode_eng(d);
            let leg = match from_seq {
                Some(from_seq) => Leg::Decode {
                    req: i,
                    from,
                    from_seq,
                },
                // The prefill kept no KV for us: the decode engine prefills it itself.
                None => Leg::Local { req: i },
            };
            self.q.push(
                t + self.engines[e].c_req + self.cfg.leg_overhead_s,
                Ev::Submit {
                    eng: e,
                    req: i,
                    leg,
                },
            );
        }
        self.reqs[i].routing = Some(routing);
        picked.is_some()
    }

    /// Place waiting requests in order while they fit (capacity may have freed). The queue is
    /// first come, first served, so the first that still waits holds the rest back (and an
    /// overloaded fleet does not re-plan thousands of requests on every event).
    fn retry_held(&mut self, t: f64) {
        while let Some(&(i, stage)) = self.held.front() {
            let placed = match stage {
                Stage::Arrival => self.place(t, i),
                Stage::Handoff { from, from_seq } => self.handoff(t, i, from, from_seq),
            };
            if !placed {
                break;
            }
            self.held.pop_front();
        }
    }

    fn submit(&mut self, t: f64, e: usize, i: usize, leg: Leg) {
        let req = &self.reqs[i];
        let prompt = req.prompt.clone().expect("prompt until done");
        let output = req.output as usize;
        let eng = &mut self.engines[e];
        let id = eng.next_seq;
        eng.next_seq += 1;
        eng.sched.add(NewSeq {
            id,
            prompt,
            max_tokens: if matches!(leg, Leg::Prefill { .. }) {
                1
            } else {
                output
            },
            remote_prefill: matches!(leg, Leg::Decode { .. }),
            remote_decode: matches!(leg, Leg::Prefill { .. }),
        });
        eng.legs.insert(id, leg);
        self.kick(t, e);
    }

    fn kick(&mut self, t: f64, e: usize) {
        let eng = &mut self.engines[e];
        if eng.plan.is_none() && !eng.kick {
            eng.kick = true;
            self.q.push(t, Ev::Kick(e));
        }
    }

    fn step(&mut self, t: f64, e: usize) {
        let plan = self.engines[e].sched.schedule();
        self.after_plan(t, e, &plan);
        self.drain_events(t, e);
        if plan.is_empty() {
            return;
        }
        let eng = &mut self.engines[e];
        let dur = eng.cost.step_time(&eng.sched.shape(&plan)).as_secs_f64();
        eng.plan = Some(plan);
        self.stats.steps += 1;
        self.q.push(t + dur, Ev::StepEnd(e));
    }

    fn after_plan(&mut self, t: f64, e: usize, plan: &StepPlan) {
        self.stats.preemptions += plan.preempted.len() as u64;
        // Cached tokens as the engine reports them: where the first scheduled chunk starts.
        for s in &plan.scheduled {
            if s.start == 0 || !plan.first_scheduled.contains(&s.id) {
                continue;
            }
            if let Some(Leg::Prefill { req } | Leg::Local { req }) = self.engines[e].legs.get(&s.id)
            {
                self.reqs[*req].cached = s.start as u64;
            }
        }
        for tr in &plan.transfers {
            let eng = &self.engines[e];
            let Some(&Leg::Decode {
                req,
                from,
                from_seq,
            }) = eng.legs.get(&tr.id)
            else {
                continue;
            };
            let prompt = self.reqs[req].prompt_len as u64;
            let hit = (tr.local_hit_blocks * eng.block_size) as u64;
            let bytes = prompt.saturating_sub(hit) * eng.kv_bytes_per_token;
            let over = [eng.nic, self.engines[from].nic];
            let tag = Tag::Pull {
                eng: e,
                seq: tr.id,
                from,
                from_seq,
                fixed: bytes > 0,
            };
            let s = self
                .links
                .start(t, if bytes > 0 { &over } else { &[] }, bytes, tag);
            for l in s.changed {
                self.watch_link(l);
            }
            for tag in s.done {
                self.landed(t, tag);
            }
        }
        for h in &plan.host_loads {
            let eng = &self.engines[e];
            let bytes = h.tokens as u64 * eng.kv_bytes_per_token;
            let tag = Tag::HostLoad { eng: e, seq: h.id };
            let s = self.links.start(t, &[eng.pcie], bytes, tag);
            for l in s.changed {
                self.watch_link(l);
            }
            for tag in s.done {
                self.landed(t, tag);
            }
        }
    }

    fn watch_link(&mut self, l: usize) {
        if let Some((at, version)) = self.links.next_check(l) {
            self.q.push(at, Ev::LinkCheck { link: l, version });
        }
    }

    /// A transfer's bytes are through: a pull then pays its link's fixed cost.
    fn landed(&mut self, t: f64, tag: Tag) {
        match tag {
            Tag::Pull {
                eng, fixed: true, ..
            } => {
                let at = t + self.engines[eng].c_xfer;
                self.q.push(at, Ev::PullDone(tag));
            }
            Tag::Pull { .. } => self.pull_done(t, tag),
            Tag::HostLoad { eng, seq } => {
                self.engines[eng].sched.host_load_done(seq);
                self.drain_events(t, eng);
                self.kick(t, eng);
            }
        }
    }

    fn pull_done(&mut self, t: f64, tag: Tag) {
        let Tag::Pull {
            eng,
            seq,
            from,
            from_seq,
            ..
        } = tag
        else {
            return;
        };
        self.engines[eng].sched.remote_kv_done(seq);
        self.drain_events(t, eng);
        self.kick(t, eng);
        // The one-way read notification frees the prefill engine's pinned blocks.
        self.engines[from].sched.release_pinned(from_seq);
        self.drain_events(t, from);
    }

    fn drain_events(&mut self, t: f64, e: usize) {
        let eng = &mut self.engines[e];
        let events = eng.sched.take_events();
        if !events.is_empty() && self.coord.wants_events(eng.decode_pool) {
            self.coord
                .kv_events(t, eng.decode_pool, eng.pool_idx, &events);
        }
    }

    fn step_end(&mut self, t: f64, e: usize) {
        let plan = self.engines[e].plan.take().expect("a step was running");
        let outputs = self.engines[e]
            .sched
            .complete(&plan, &mut |_, _, _| (OUTPUT_TOKEN, None));
        self.drain_events(t, e);
        for o in outputs {
            self.output(t, e, o);
        }
        self.step(t, e);
    }

    fn output(&mut self, t: f64, e: usize, o: StepOutput) {
        let Some(&leg) = self.engines[e].legs.get(&o.id) else {
            return;
        };
        match leg {
            Leg::Prefill { req } => {
                let Some(f) = o.finished else {
                    return;
                };
                self.engines[e].legs.remove(&o.id);
                let p = self.engines[e].pool_idx;
                let r = &mut self.reqs[req];
                r.answered = Some(t);
                let (_, work) = r.prefill.expect("a prefill leg was sent");
                let computed = u64::from(r.prompt_len).saturating_sub(r.cached);
                self.coord.prefill_answered(t, p, work, computed);
                let from_seq = f.pinned_blocks.is_some().then_some(o.id);
                if !self.handoff(t, req, e, from_seq) {
                    self.stats.held += 1;
                    self.held
                        .push_back((req, Stage::Handoff { from: e, from_seq }));
                }
                self.retry_held(t);
            }
            Leg::Decode { req, .. } | Leg::Local { req } => {
                let d = self.engines[e].pool_idx;
                let r = &mut self.reqs[req];
                r.tokens += 1;
                match r.first {
                    None => {
                        r.first = Some(t);
                        if (t - r.arrival) * 1000.0 > self.cfg.slo.ttft_ms {
                            r.missed = true;
                            self.stats.misses += 1;
                        }
                        self.coord.decode_began(d, req);
                    }
                    Some(_) => r.itl.push(t - r.last),
                }
                r.last = t;
                if o.finished.is_some() {
                    self.engines[e].legs.remove(&o.id);
                    let r = &mut self.reqs[req];
                    let slow = r.tokens > 1
                        && (t - r.first.unwrap_or(t)) * 1000.0 / f64::from(r.tokens - 1)
                            > self.cfg.slo.tpot_ms;
                    if slow && !r.missed {
                        r.missed = true;
                        self.stats.misses += 1;
                    }
                    r.done = true;
                    r.prompt = None;
                    r.routing = None;
                    self.finished += 1;
                    self.end = self.end.max(t);
                    self.coord.decode_done(d, req);
                    self.retry_held(t);
                }
            }
        }
    }

    fn scrape(&mut self, t: f64) {
        let n = self.cfg.prefill.len();
        for d in 0..self.cfg.decode.len() {
            let s = &self.engines[n + d].sched;
            let used = (s.kv_usage() * f64::from(s.num_blocks())).round() as u64;
            self.coord.scraped(d, used);
        }
        self.retry_held(t);
        // With nothing else due, nothing can change any more: requests still waiting would wait
        // forever, and the run ends with them unfinished rather than scraping for ever.
        if self.finished < self.reqs.len() && !self.q.is_empty() {
            self.q.push(t + self.coord.scrape_every(), Ev::Scrape);
        }
    }

    fn report(mut self) -> FleetReport {
        let name = |pool: &str, i: usize| format!("{pool}{i}");
        let outcomes: Vec<Outcome> = self
            .reqs
            .iter_mut()
            .map(|r| {
                let first = r.first.unwrap_or(r.last);
                let ms = |s: f64| s * 1000.0;
                let phases = r
                    .dispatched
                    .zip(r.decode_sent)
                    .zip(r.first)
                    .map(|((q, ds), f)| {
                        let answered = r.answered.unwrap_or(q);
                        [
                            ms(q - r.arrival),
                            ms(answered - q),
                            ms(ds - answered),
                            ms(f - ds),
                        ]
                    });
                Outcome {
                    ok: r.done,
                    ttft_ms: ms(first - r.arrival),
                    itl_ms: std::mem::take(&mut r.itl).into_iter().map(ms).collect(),
                    e2e_ms: ms(r.last - r.arrival),
                    output_tokens: r.tokens,
                    prompt_tokens: r.prompt_len,
                    cached_tokens: r.cached.min(u64::from(r.prompt_len)) as u32,
                    prefill_engine: match (r.prefill, r.decode) {
                        (Some((p, _)), _) => Some(name("p", p)),
                        (None, d) => d.map(|d| name("d", d)),
                    },
                    decode_engine: r.decode.map(|d| name("d", d)),
                    phases_ms: phases,
                }
            })
            .collect();
        self.stats.unfinished = (self.reqs.len() - self.finished) as u64;
        let p: Vec<String> = (0..self.cfg.prefill.len()).map(|i| name("p", i)).collect();
        let d: Vec<String> = (0..self.cfg.decode.len()).map(|i| name("d", i)).collect();
        let summary = Summary::from_outcomes(&outcomes, self.cfg.slo, self.end)
            .with_engines(if p.is_empty() { &d } else { &p }, &d);
        FleetReport {
            summary,
            stats: self.stats,
        }
    }
}
