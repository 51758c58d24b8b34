//! The admission queue's discipline as a plain data structure: no IO, no clock (time is an
//! argument), no locking (the caller holds the one lock around it).
//!
//! Waiters are in two stages, each with its own order: `Arrival` (before any engine work: no
//! decode room in the pool, or every prefill engine's queue full) and `Handoff` (the prefill is
//! done and no decode engine has KV room for it). Within a stage the order is
//!
//! 1. the class: interactive, then default, then batch (strict priority);
//! 2. within a class, weighted-fair across tenants by start-time fair queueing: each tenant's
//!    waiters form a FIFO (a flow), and only the flow's first waiter is ordered, by its start
//!    tag `S = max(V, F)`, where `F` is the tenant's finish tag and `V` the class's clock (the
//!    start tag of its latest admission). An admission moves the tenant's `F` to
//!    `S + cost / weight` (cost: the request's decode KV blocks), so tenants that all keep
//!    requests waiting are admitted in proportion to their weights, and one that was idle
//!    starts at the clock instead of being owed its idle time. Only admissions are charged: a
//!    waiter that is refused, shed or given up on costs its tenant nothing;
//! 3. arrival order (which breaks ties between flows too).
//!
//! At the handoff the request was charged when it was admitted on arrival: classes, then arrival
//! order. Admissions that found room without waiting are charged too ([`Queue::charge`]), or a
//! tenant that had the pool to itself would arrive at the first contention with no debt and
//! pass everyone.
//!
//! Only a stage's head may take room ([`Queue::is_head`]): a request never passes one ahead of
//! it, so a large request is not starved by smaller ones behind it (the cost: while the head
//! cannot fit, nobody behind it in that stage is admitted; its deadline bounds that).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tandem_config::Priority;
use tokio::time::Instant;

/// The stages, each ordered and served on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Arrival,
    Handoff,
}

impl Stage {
    fn index(self) -> usize {
        match self {
            Stage::Arrival => 0,
            Stage::Handoff => 1,
        }
    }
}

/// Why a request is held; worded in its 503 if it waits too long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    /// No decode engine has KV room for it (or, before its prefill, the decode pool as a whole
    /// has none left once the requests already in prefill are counted).
    DecodeKv,
    /// Every prefill engine has `admission.max_prefill_queue_tokens` queued.
    PrefillQueue,
}

/// Why a request was refused: the `reason` label of `tandem_admission_rejected_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `admission.max_queued` waiting, and nobody of a lower class to shed.
    QueueFull,
    /// The tenant has `admission.max_queued_per_tenant` waiting.
    TenantQueueFull,
    /// It waited its class's longest wait.
    Deadline,
    /// A newcomer of a higher class took its place in the full queue.
    Shed,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::QueueFull => "queue_full",
            Refusal::TenantQueueFull => "tenant_queue_full",
            Refusal::Deadline => "deadline",
            Refusal::Shed => "shed",
        }
    }
}

/// The `reason` label of `tandem_admission_queued_total`.
pub fn wait_reason(stage: Stage, held: Held) -> &'static str {
    match (stage, held) {
        (Stage::Handoff, _) => "handoff",
        (Stage::Arrival, Held::DecodeKv) => "decode_kv",
        (Stage::Arrival, Held::PrefillQueue) => "prefill_queue",
    }
}

/// 0 is served first.
pub fn rank(class: Priority) -> usize {
    match class {
        Priority::Interactive => 0,
        Priority::Default => 1,
        Priority::Batch => 2,
    }
}

pub const CLASSES: [Priority; 3] = [Priority::Interactive, Priority::Default, Priority::Batch];

/// The bounds, from `[admission]`.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_queued: usize,
    /// `None`: a tenant may fill the queue.
    pub max_per_tenant: Option<usize>,
    pub shed: bool,
    /// Longest wait per class, by [`rank`].
    pub max_wait: [Duration; 3],
}

impl Limits {
    pub fn from_config(c: &tandem_config::AdmissionConfig) -> Limits {
        // A month stands for "as long as you like" without overflowing an `Instant`.
        let wait = |class| Duration::from_millis(c.max_wait_ms_for(class).min(30 * 86_400_000));
        Limits {
            max_queued: c.max_queued as usize,
            max_per_tenant: c.max_queued_per_tenant.map(|n| n as usize),
            shed: c.shed,
            max_wait: CLASSES.map(wait),
        }
    }
}

/// Who asks, and for what.
#[derive(Debug, Clone)]
pub struct Request {
    pub stage: Stage,
    pub class: Priority,
    pub tenant: Arc<str>,
    /// 1 ..= `tandem_config::keys::MAX_WEIGHT`.
    pub weight: u32,
    /// Decode KV blocks: what the request takes from the pool.
    pub cost: u64,
}

/// Virtual time per unit of cost at weight 1; large so `cost / weight` keeps its precision.
const SCALE: u128 = 1 << 32;

/// Idle tenants' tags are kept (a tenant ahead of its share stays behind the others when it
/// returns) until this many accumulate; then those with nothing waiting are forgotten, which
/// forgives them their lead. Tenants come from the key file, so this is rarely reached.
const MAX_IDLE_FLOWS: usize = 4096;

/// A place in a stage's order: smallest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    rank: usize,
    tag: u128,
    seq: u64,
}

#[derive(Debug)]
struct Entry<T> {
    stage: Stage,
    class: Priority,
    tenant: Arc<str>,
    seq: u64,
    /// `cost / weight` in virtual time: what its admission charges its tenant.
    inc: u128,
    /// Its key while it is in its stage's order (a handoff waiter, or its flow's first).
    key: Option<Key>,
    held: Held,
    payload: T,
}

/// One tenant's arrival-stage waiters within a class, and its finish tag.
#[derive(Debug, Default)]
struct Flow {
    waiters: VecDeque<u64>,
    finish: u128,
    /// The waiters' `inc`s summed: how far past the head's start tag the flow reaches.
    backlog: u128,
}

/// A request let in to wait.
#[derive(Debug)]
pub struct Entered<T> {
    pub id: u64,
    pub deadline: Instant,
    /// The waiter refused to make room for it, with its class: tell it.
    pub shed: Option<(T, Priority)>,
    /// The stage head that shedding exposed (another stage's newcomer shed it): let it try.
    pub new_head: Option<T>,
}

#[derive(Debug)]
pub struct Queue<T> {
    limits: Limits,
    entries: HashMap<u64, Entry<T>>,
    order: [BTreeMap<Key, u64>; 2],
    /// `V` per class: the tag of the class's latest arrival-stage admission.
    clock: [u128; 3],
    flows: HashMap<(usize, Arc<str>), Flow>,
    per_tenant: HashMap<Arc<str>, usize>,
    per_class: [usize; 3],
    peak: usize,
    next_seq: u64,
    /// Each stage's last known reason, for one who joins a stage without a head to inherit it.
    last_held: [Held; 2],
}

impl<T: Clone> Queue<T> {
    pub fn new(limits: Limits) -> Queue<T> {
        Queue {
            limits,
            entries: HashMap::new(),
            order: [BTreeMap::new(), BTreeMap::new()],
            clock: [0; 3],
            flows: HashMap::new(),
            per_tenant: HashMap::new(),
            per_class: [0; 3],
            peak: 0,
            next_seq: 0,
            last_held: [Held::DecodeKv; 2],
        }
    }

    fn inc(r: &Request) -> u128 {
        u128::from(r.cost.max(1)) * SCALE / u128::from(r.weight.max(1))
    }

    fn flow_key(r: &Request) -> (usize, Arc<str>) {
        (rank(r.class), r.tenant.clone())
    }

    /// The start tag a flow's next first waiter gets now.
    fn start_tag(&self, k: usize, flow: Option<&Flow>) -> u128 {
        flow.map_or(0, |f| f.finish).max(self.clock[k])
    }

    /// Whether `r` would be its stage's head if it entered now: then it may try for room at
    /// once; otherwise it waits behind the head without trying, so it cannot take the room the
    /// head is waiting for.
    pub fn leads(&self, r: &Request) -> bool {
        let k = rank(r.class);
        let tag = match r.stage {
            Stage::Handoff => 0,
            Stage::Arrival => {
                let flow = self.flows.get(&Self::flow_key(r));
                if flow.is_some_and(|f| !f.waiters.is_empty()) {
                    // Behind its own tenant's waiters.
                    return false;
                }
                self.start_tag(k, flow)
            }
        };
        let key = Key {
            rank: k,
            tag,
            seq: self.next_seq,
        };
        self.order[r.stage.index()]
            .first_key_value()
            .is_none_or(|(head, _)| key < *head)
    }

    /// `r` found room without waiting: charge its tenant as if it had been admitted from the
    /// queue.
    pub fn charge(&mut self, r: &Request) {
        if r.stage == Stage::Arrival {
            let k = rank(r.class);
            let start = self.start_tag(k, self.flows.get(&Self::flow_key(r)));
            self.admitted(k, r.tenant.clone(), start, Self::inc(r));
        }
    }

    /// An arrival-stage admission with start tag `start`: the tenant's finish tag and the
    /// class's clock move.
    fn admitted(&mut self, k: usize, tenant: Arc<str>, start: u128, inc: u128) {
        self.flows.entry((k, tenant)).or_default().finish = start.saturating_add(inc);
        self.clock[k] = self.clock[k].max(start);
        if self.flows.len() > MAX_IDLE_FLOWS {
            self.flows.retain(|_, f| !f.waiters.is_empty());
        }
    }

    /// Put the first waiter of flow `fk` (if any) in the arrival order.
    fn order_flow_head(&mut self, fk: &(usize, Arc<str>)) {
        let Some(flow) = self.flows.get(fk) else {
            return;
        };
        let Some(&id) = flow.waiters.front() else {
            return;
        };
        let key = Key {
            rank: fk.0,
            tag: self.start_tag(fk.0, Some(flow)),
            seq: self.entries[&id].seq,
        };
        self.order[Stage::Arrival.index()].insert(key, id);
        self.entries.get_mut(&id).expect("a flow's waiter").key = Some(key);
    }

    /// Why a stage's waiters wait: its head's reason (the last known one when it has none).
    /// One who joins behind the head without trying waits for the same room.
    pub fn head_held(&self, stage: Stage) -> Held {
        let s = stage.index();
        self.order[s]
            .first_key_value()
            .map_or(self.last_held[s], |(_, id)| self.entries[id].held)
    }

    /// Let `r` wait, if the bounds allow (shedding a lower class's waiter when the queue is
    /// full and that is allowed), because of `held`. Its deadline is `now` plus its class's
    /// longest wait.
    pub fn enter(
        &mut self,
        r: &Request,
        held: Held,
        payload: T,
        now: Instant,
    ) -> Result<Entered<T>, Refusal> {
        if let Some(max) = self.limits.max_per_tenant {
            if self.per_tenant.get(&r.tenant).copied().unwrap_or(0) >= max {
                return Err(Refusal::TenantQueueFull);
            }
        }
        let mut shed = None;
        let mut new_head = None;
        if self.entries.len() >= self.limits.max_queued {
            let victim = self
                .limits
                .shed
                .then(|| self.victim(rank(r.class)))
                .flatten()
                .ok_or(Refusal::QueueFull)?;
            let (t, class, exposed) = self.remove(victim, false).expect("the victim waits");
            shed = Some((t, class));
            new_head = exposed;
        }
        let s = r.stage.index();
        self.last_held[s] = held;
        let k = rank(r.class);
        let id = self.next_seq;
        self.next_seq += 1;
        let inc = Self::inc(r);
        self.entries.insert(
            id,
            Entry {
                stage: r.stage,
                class: r.class,
                tenant: r.tenant.clone(),
                seq: id,
                inc,
                key: None,
                held,
                payload,
            },
        );
        match r.stage {
            Stage::Handoff => {
                let key = Key {
                    rank: k,
                    tag: 0,
                    seq: id,
                };
                self.order[s].insert(key, id);
                self.entries.get_mut(&id).expect("just inserted").key = Some(key);
            }
            Stage::Arrival => {
                let fk = Self::flow_key(r);
                let flow = self.flows.entry(fk.clone()).or_default();
                flow.waiters.push_back(id);
                flow.backlog += inc;
                if flow.waiters.len() == 1 {
                    self.order_flow_head(&fk);
                }
            }
        }
        let deadline = now + self.limits.max_wait[k];
        *self.per_tenant.entry(r.tenant.clone()).or_default() += 1;
        self.per_class[k] += 1;
        self.peak = self.peak.max(self.entries.len());
        // Shedding for a newcomer of the other stage may expose a head there; in this stage the
        // newcomer is ahead of whoever it shed.
        Ok(Entered {
            id,
            deadline,
            shed,
            new_head,
        })
    }

    /// The arrival-stage waiter a newcomer of rank `k` may shed: of the lowest class below `k`
    /// that has waiters, the one that would be admitted last (the newest of the tenant whose
    /// waiters reach furthest in virtual time). Handoff waiters hold a finished prefill's KV
    /// and are never shed.
    fn victim(&self, k: usize) -> Option<u64> {
        (k + 1..CLASSES.len()).rev().find_map(|lower| {
            self.flows
                .iter()
                .filter(|((r, _), f)| *r == lower && !f.waiters.is_empty())
                .map(|((r, _), f)| {
                    let last = *f.waiters.back().expect("non-empty");
                    let reach = self.start_tag(*r, Some(f)).saturating_add(f.backlog);
                    (reach, last)
                })
                .max()
                .map(|(_, last)| last)
        })
    }

    /// Take `id` out: its payload, its class, and the stage's new head if the head changed.
    fn remove(&mut self, id: u64, admitted: bool) -> Option<(T, Priority, Option<T>)> {
        let e = self.entries.remove(&id)?;
        let s = e.stage.index();
        let head_before = self.order[s].first_key_value().map(|(_, h)| *h);
        if let Some(key) = e.key {
            self.order[s].remove(&key);
        }
        if e.stage == Stage::Arrival {
            let k = rank(e.class);
            let fk = (k, e.tenant.clone());
            let flow = self.flows.get_mut(&fk).expect("an arrival waiter's flow");
            flow.waiters.retain(|w| *w != id);
            flow.backlog -= e.inc;
            if let (true, Some(key)) = (admitted, e.key) {
                self.admitted(k, e.tenant.clone(), key.tag, e.inc);
            }
            if e.key.is_some() {
                // It was its flow's first: the next one is ordered from the tags now.
                self.order_flow_head(&fk);
            }
        }
        let head_after = self.order[s].first_key_value().map(|(_, h)| *h);
        let exposed = match head_after {
            Some(h) if head_before == Some(id) => Some(self.entries[&h].payload.clone()),
            _ => None,
        };
        if let Some(n) = self.per_tenant.get_mut(&e.tenant) {
            *n -= 1;
            if *n == 0 {
                self.per_tenant.remove(&e.tenant);
            }
        }
        self.per_class[rank(e.class)] -= 1;
        Some((e.payload, e.class, exposed))
    }

    /// `id` leaves: admitted, or gone (refused, or its client left). Returns the stage's new
    /// head when `id` was the head, which should try for room now. Leaving twice is a no-op.
    pub fn leave(&mut self, id: u64, admitted: bool) -> Option<T> {
        self.remove(id, admitted)
            .and_then(|(_, _, exposed)| exposed)
    }

    /// Whether `id` is first in its stage (only the head may take room).
    pub fn is_head(&self, id: u64) -> bool {
        self.entries.get(&id).is_some_and(|e| {
            self.order[e.stage.index()]
                .first_key_value()
                .is_some_and(|(_, h)| *h == id)
        })
    }

    #[cfg(test)]
    pub fn contains(&self, id: u64) -> bool {
        self.entries.contains_key(&id)
    }

    /// `id` tried and found no room, for this reason.
    pub fn set_held(&mut self, id: u64, held: Held) {
        if let Some(e) = self.entries.get_mut(&id) {
            e.held = held;
            self.last_held[e.stage.index()] = held;
        }
    }

    pub fn held(&self, id: u64) -> Option<Held> {
        self.entries.get(&id).map(|e| e.held)
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn waiting(&self, class: Priority) -> usize {
        self.per_class[rank(class)]
    }

    /// The most that ever waited at once.
    pub fn peak(&self) -> usize {
        self.peak
    }

    /// A stage's waiters, head first.
    #[cfg(test)]
    pub fn ids(&self, stage: Stage) -> Vec<u64> {
        self.order[stage.index()].values().copied().collect()
    }
}
