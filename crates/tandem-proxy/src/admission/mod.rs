//! The admission queue: requests that find no room wait here, and when room frees the next one
//! in the discipline's order (`queue.rs`: class, then weighted-fair across tenants, then arrival)
//! is admitted, not whichever task wakes first.
//!
//! One `Mutex` around the pure [`Queue`], held for a map update at a time. Each waiter holds a
//! [`Place`] with its own ticket (a `Notify`). Only a stage's head listens for freed room (every
//! release and published scrape); when it is admitted or leaves, the next head's ticket is
//! notified and that one tries at once, so room that is left over goes on down the line. A
//! newcomer tries at once only if it would be the head. Dropping the waiting future (the client
//! left) drops the `Place`, which takes the entry out. Every wait is counted in
//! `tandem_admission_queued_total{class,reason}`, every refusal in
//! `tandem_admission_rejected_total{class,reason}`.

mod queue;
#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use prometheus_client::metrics::gauge::Gauge;
use tandem_config::{AdmissionConfig, Priority, Tenant};
use tandem_policy::PlanError;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use crate::error::ProxyError;
use crate::metrics::{AdmissionLabels, ClassLabels, Metrics};
use crate::route::RouteError;
pub(crate) use queue::{Held, Stage};
use queue::{Limits, Queue, Refusal, Request, CLASSES};

/// Whose request this is, as the queue orders it: the tenant (with `[auth]` off, one anonymous
/// tenant of the default class), its class and weight; and the engine group it is routed in
/// (`split.rs`), so every plan and handoff of the request sees only that group's engines.
#[derive(Debug, Clone)]
pub(crate) struct Who {
    tenant: Arc<str>,
    class: Priority,
    weight: u32,
    pub group: Arc<str>,
}

impl Who {
    pub fn of(tenant: Option<&Tenant>) -> Who {
        match tenant {
            Some(t) => Who {
                tenant: t.name.as_str().into(),
                class: t.priority,
                weight: t.weight,
                group: tandem_config::DEFAULT_GROUP.into(),
            },
            None => Who {
                tenant: "".into(),
                class: Priority::Default,
                weight: 1,
                group: tandem_config::DEFAULT_GROUP.into(),
            },
        }
    }

    fn request(&self, stage: Stage, cost: u64) -> Request {
        Request {
            stage,
            class: self.class,
            tenant: self.tenant.clone(),
            weight: self.weight,
            cost,
        }
    }
}

/// A waiter's ticket: notified when it becomes its stage's head, or when it is shed.
#[derive(Debug, Default)]
struct Ticket {
    wake: Notify,
    shed: AtomicBool,
}

/// The queue and its gauges.
#[derive(Debug)]
pub(crate) struct Admission {
    queue: Mutex<Queue<Arc<Ticket>>>,
    metrics: Arc<Metrics>,
    /// `tandem_admission_waiting{class}`, by class rank.
    waiting: [Gauge; 3],
    retry_after: u64,
}

impl Admission {
    pub fn new(cfg: &AdmissionConfig, metrics: Arc<Metrics>) -> Admission {
        let waiting = CLASSES.map(|c| {
            metrics
                .admission_waiting
                .get_or_create(&ClassLabels { class: c.as_str() })
                .clone()
        });
        Admission {
            queue: Mutex::new(Queue::new(Limits::from_config(cfg))),
            metrics,
            waiting,
            retry_after: cfg.retry_after_secs,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Queue<Arc<Ticket>>> {
        self.queue.lock().expect("admission queue lock")
    }

    /// Requests waiting now, every class together.
    #[cfg(test)]
    pub fn waiting(&self) -> usize {
        self.lock().len()
    }

    /// Set under the lock, so the gauges move in the order the queue did.
    fn observe(&self, q: &Queue<Arc<Ticket>>) {
        for (g, c) in self.waiting.iter().zip(CLASSES) {
            g.set(q.waiting(c) as i64);
        }
        self.metrics.admission_waiting_peak.set(q.peak() as i64);
    }

    fn count(&self, family: Family, class: Priority, reason: &'static str) {
        if !self.metrics.enabled() {
            return;
        }
        let f = match family {
            Family::Queued => &self.metrics.admission_queued,
            Family::Rejected => &self.metrics.admission_rejected,
        };
        f.get_or_create(&AdmissionLabels {
            class: class.as_str(),
            reason,
        })
        .inc();
    }

    fn refuse(&self, class: Priority, why: Refusal, held: Held) -> RouteError {
        self.count(Family::Rejected, class, why.as_str());
        RouteError::Refused(ProxyError::Overloaded {
            reason: message(why, held, class),
            retry_after: self.retry_after,
        })
    }

    /// Let `r` wait, or refuse it (counted). Tells a waiter shed for it, and a head exposed.
    /// `held`: `None` when it joins behind others without having tried; it takes the head's
    /// reason.
    fn enter(&self, r: &Request, held: Option<Held>) -> Result<Place<'_>, RouteError> {
        let ticket = Arc::new(Ticket::default());
        let mut q = self.lock();
        let held = held.unwrap_or_else(|| q.head_held(r.stage));
        let entered = q.enter(r, held, ticket.clone(), Instant::now());
        self.observe(&q);
        drop(q);
        let e = entered.map_err(|why| self.refuse(r.class, why, held))?;
        if let Some((victim, _)) = &e.shed {
            victim.shed.store(true, Ordering::Release);
            victim.wake.notify_one();
        }
        if let Some(h) = &e.new_head {
            h.wake.notify_one();
        }
        self.count(Family::Queued, r.class, queue::wait_reason(r.stage, held));
        Ok(Place {
            adm: self,
            id: e.id,
            class: r.class,
            deadline: e.deadline,
            ticket,
            admitted: false,
        })
    }
}

#[derive(Debug, Clone, Copy)]
enum Family {
    Queued,
    Rejected,
}

/// A place in the queue; leaves it when dropped (admitted, refused, or the client gone), and
/// lets the next head try when it was the head.
struct Place<'a> {
    adm: &'a Admission,
    id: u64,
    class: Priority,
    deadline: Instant,
    ticket: Arc<Ticket>,
    admitted: bool,
}

impl Place<'_> {
    fn is_head(&self) -> bool {
        self.adm.lock().is_head(self.id)
    }

    fn set_held(&self, held: Held) {
        self.adm.lock().set_held(self.id, held);
    }

    fn held(&self) -> Held {
        self.adm.lock().held(self.id).unwrap_or(Held::DecodeKv)
    }
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        let mut q = self.adm.lock();
        let next = q.leave(self.id, self.admitted);
        self.adm.observe(&q);
        drop(q);
        if let Some(next) = next {
            next.wake.notify_one();
        }
    }
}

/// Wait in the admission queue until `attempt` finds room (tried, while this request is its
/// stage's head, after every release on `freed` and every pool table published on `pools`), or
/// it is refused: the queue or its tenant's share full, shed for a higher class, or its class's
/// longest wait passed. `cost` is the request's decode KV blocks, what its tenant is charged.
pub(crate) async fn wait_for_room<P: Clone, T>(
    adm: &Admission,
    pools: &watch::Receiver<P>,
    freed: &Notify,
    who: &Who,
    stage: Stage,
    cost: u64,
    mut attempt: impl FnMut(&P) -> Result<Result<T, Held>, PlanError>,
) -> Result<T, RouteError> {
    let req = who.request(stage, cost);
    let mut rx = pools.clone();
    let mut place: Option<Place<'_>> = None;
    // A newcomer behind others waits without trying: it could take the room they wait for.
    let mut try_now = adm.lock().leads(&req);
    let mut held = None;
    loop {
        // Registered before trying, so a release between the try and the wait still wakes us.
        let freed = freed.notified();
        tokio::pin!(freed);
        freed.as_mut().enable();
        if try_now {
            let snapshot = rx.borrow_and_update().clone();
            match attempt(&snapshot).map_err(RouteError::Plan)? {
                Ok(t) => {
                    match place.take() {
                        Some(mut p) => p.admitted = true,
                        None => adm.lock().charge(&req),
                    }
                    return Ok(t);
                }
                Err(h) => {
                    held = Some(h);
                    if let Some(p) = &place {
                        p.set_held(h);
                    }
                }
            }
        }
        if place.is_none() {
            place = Some(adm.enter(&req, held)?);
        }
        let p = place.as_ref().expect("entered above");
        let head = p.is_head();
        if head && !try_now {
            // First in line without having tried (those ahead left meanwhile): try now.
            try_now = true;
            continue;
        }
        tokio::select! {
            _ = &mut freed, if head => {}
            r = rx.changed(), if head => if r.is_err() {
                return Err(RouteError::Plan(PlanError::NoDecodeEngine));
            },
            _ = p.ticket.wake.notified() => {}
            _ = tokio::time::sleep_until(p.deadline) => {
                return Err(adm.refuse(p.class, Refusal::Deadline, p.held()));
            }
        }
        if p.ticket.shed.load(Ordering::Acquire) {
            return Err(adm.refuse(p.class, Refusal::Shed, p.held()));
        }
        try_now = p.is_head();
    }
}

/// The 503's wording. Never a tenant name or an engine: only which bound was hit.
fn message(why: Refusal, held: Held, class: Priority) -> &'static str {
    use Priority::{Batch, Default, Interactive};
    match (why, held, class) {
        (Refusal::QueueFull, Held::DecodeKv, _) => {
            "no decode engine has KV room and the admission queue is full"
        }
        (Refusal::QueueFull, Held::PrefillQueue, _) => {
            "every prefill engine's queue is full and the admission queue is full"
        }
        (Refusal::TenantQueueFull, _, _) => {
            "no engine has room and this tenant already has admission.max_queued_per_tenant \
             requests waiting"
        }
        (Refusal::Shed, _, _) => {
            "no engine had room, and a request of a higher priority class took this one's place \
             in the full admission queue"
        }
        (Refusal::Deadline, Held::DecodeKv, Interactive) => {
            "no decode engine had KV room within admission.interactive_max_wait_ms"
        }
        (Refusal::Deadline, Held::DecodeKv, Default) => {
            "no decode engine had KV room within admission.max_wait_ms"
        }
        (Refusal::Deadline, Held::DecodeKv, Batch) => {
            "no decode engine had KV room within admission.batch_max_wait_ms"
        }
        (Refusal::Deadline, Held::PrefillQueue, Interactive) => {
            "no prefill engine's queue had room within admission.interactive_max_wait_ms"
        }
        (Refusal::Deadline, Held::PrefillQueue, Default) => {
            "no prefill engine's queue had room within admission.max_wait_ms"
        }
        (Refusal::Deadline, Held::PrefillQueue, Batch) => {
            "no prefill engine's queue had room within admission.batch_max_wait_ms"
        }
    }
}
