//! The discipline (`queue.rs`) on its own, with explicit times; then the waiting edge under
//! paused time, with a stand-in for the pool's room.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tandem_config::Priority::{Batch, Default as Normal, Interactive};

use super::queue::*;
use super::*;

fn limits(max_queued: usize, per_tenant: Option<usize>) -> Limits {
    Limits {
        max_queued,
        max_per_tenant: per_tenant,
        shed: true,
        max_wait: [
            Duration::from_millis(1_000),
            Duration::from_millis(5_000),
            Duration::from_millis(30_000),
        ],
    }
}

fn req(stage: Stage, class: Priority, tenant: &str, weight: u32) -> Request {
    Request {
        stage,
        class,
        tenant: tenant.into(),
        weight,
        cost: 10,
    }
}

fn arrival(class: Priority, tenant: &str) -> Request {
    req(Stage::Arrival, class, tenant, 1)
}

/// Payloads name the request, so a test reads which one was shed or exposed.
type Q = Queue<&'static str>;

fn enter(q: &mut Q, r: &Request, name: &'static str) -> u64 {
    q.enter(r, Held::DecodeKv, name, Instant::now())
        .expect("room in the queue")
        .id
}

/// Admit heads one after the other: the order room would go in.
fn drain(q: &mut Q, stage: Stage, names: &HashMap<u64, &'static str>) -> Vec<&'static str> {
    let mut out = Vec::new();
    while let Some(&head) = q.ids(stage).first() {
        assert!(q.is_head(head));
        out.push(names[&head]);
        q.leave(head, true);
    }
    out
}

#[test]
fn classes_go_first_then_arrival_order_within_a_tenant() {
    let mut q = Q::new(limits(16, None));
    let mut names = HashMap::new();
    for (class, name) in [
        (Batch, "b1"),
        (Normal, "d1"),
        (Batch, "b2"),
        (Interactive, "i1"),
        (Normal, "d2"),
        (Interactive, "i2"),
    ] {
        names.insert(enter(&mut q, &arrival(class, "t"), name), name);
    }
    assert_eq!(
        drain(&mut q, Stage::Arrival, &names),
        ["i1", "i2", "d1", "d2", "b1", "b2"]
    );
    assert_eq!(q.len(), 0);
}

#[test]
fn tenants_of_a_class_are_admitted_in_proportion_to_their_weights() {
    let mut q = Q::new(limits(64, None));
    let mut names = HashMap::new();
    // Both keep requests waiting; `light` arrived first, and with all of its requests.
    for _ in 0..12 {
        names.insert(
            enter(&mut q, &req(Stage::Arrival, Normal, "light", 1), "light"),
            "light",
        );
    }
    for _ in 0..12 {
        names.insert(
            enter(&mut q, &req(Stage::Arrival, Normal, "heavy", 3), "heavy"),
            "heavy",
        );
    }
    let order = drain(&mut q, Stage::Arrival, &names);
    let heavy = order[..12].iter().filter(|n| **n == "heavy").count();
    assert_eq!(heavy, 9, "3:1 over the first 12 admissions: {order:?}");
    // Each tenant's own requests stay in arrival order: ids grow within a tenant.
}

#[test]
fn fifo_within_a_tenant_holds_among_several_tenants() {
    let mut q = Q::new(limits(64, None));
    let mut ids = Vec::new();
    for i in 0..20 {
        let t = ["a", "b", "c"][i % 3];
        ids.push((t, enter(&mut q, &arrival(Normal, t), "x")));
    }
    let mut order = Vec::new();
    while let Some(&head) = q.ids(Stage::Arrival).first() {
        order.push(head);
        q.leave(head, true);
    }
    for t in ["a", "b", "c"] {
        let mine: Vec<u64> = order
            .iter()
            .filter(|id| ids.iter().any(|(tt, i)| tt == &t && i == *id))
            .copied()
            .collect();
        assert!(mine.windows(2).all(|w| w[0] < w[1]), "{t}: {mine:?}");
    }
}

#[test]
fn a_tenant_that_took_room_without_waiting_is_charged_for_it() {
    // Fairness holds while tenants wait: `busy` is not punished for using an idle pool, but its
    // admissions moved the class's clock, so a newcomer starts level with it instead of behind.
    let mut q = Q::new(limits(16, None));
    // `busy` had the pool to itself for 10 admissions; then both wait.
    for _ in 0..10 {
        q.charge(&arrival(Normal, "busy"));
    }
    let mut names = HashMap::new();
    for _ in 0..3 {
        names.insert(enter(&mut q, &arrival(Normal, "busy"), "busy"), "busy");
    }
    for _ in 0..3 {
        names.insert(enter(&mut q, &arrival(Normal, "new"), "new"), "new");
    }
    // Uncharged, `busy` (first to enter) would go first.
    let order = drain(&mut q, Stage::Arrival, &names);
    assert_eq!(order, ["new", "busy", "new", "busy", "new", "busy"]);
}

#[test]
fn an_idle_tenant_is_not_owed_its_idle_time() {
    let mut q = Q::new(limits(64, None));
    let mut names = HashMap::new();
    // `steady` is served 10 times from the queue while `late` sends nothing.
    for _ in 0..10 {
        let id = enter(&mut q, &arrival(Normal, "steady"), "steady");
        q.leave(id, true);
    }
    for _ in 0..4 {
        names.insert(
            enter(&mut q, &arrival(Normal, "steady"), "steady"),
            "steady",
        );
    }
    for _ in 0..4 {
        names.insert(enter(&mut q, &arrival(Normal, "late"), "late"), "late");
    }
    // `late` starts at the class's clock, not at zero: it alternates with `steady` instead of
    // taking the next ten admissions.
    let order = drain(&mut q, Stage::Arrival, &names);
    assert_eq!(
        order,
        ["late", "steady", "late", "steady", "late", "steady", "late", "steady"]
    );
}

#[test]
fn a_waiter_that_leaves_unadmitted_costs_its_tenant_nothing() {
    let mut q = Q::new(limits(64, None));
    // Five of `unlucky`'s requests wait and give up (refused, shed or the client gone).
    for _ in 0..5 {
        let id = enter(&mut q, &arrival(Batch, "unlucky"), "x");
        q.leave(id, false);
    }
    let mut names = HashMap::new();
    for _ in 0..2 {
        names.insert(
            enter(&mut q, &arrival(Batch, "unlucky"), "unlucky"),
            "unlucky",
        );
    }
    for _ in 0..2 {
        names.insert(enter(&mut q, &arrival(Batch, "other"), "other"), "other");
    }
    // Charged for them, it would go after `other` twice: refusals would feed on themselves.
    assert_eq!(
        drain(&mut q, Stage::Arrival, &names),
        ["unlucky", "other", "unlucky", "other"]
    );
}

#[test]
fn shedding_takes_from_the_tenant_whose_waiters_reach_furthest() {
    let mut q = Q::new(limits(6, None));
    let mut names = HashMap::new();
    for i in 0..3 {
        let light = ["l1", "l2", "l3"][i];
        let heavy = ["h1", "h2", "h3"][i];
        names.insert(
            enter(&mut q, &req(Stage::Arrival, Batch, "light", 1), light),
            light,
        );
        names.insert(
            enter(&mut q, &req(Stage::Arrival, Batch, "heavy", 3), heavy),
            heavy,
        );
    }
    // Weight 1's three waiters reach three costs past the clock, weight 3's one: the light
    // tenant's newest would be admitted last.
    let e = q
        .enter(
            &arrival(Interactive, "u"),
            Held::DecodeKv,
            "i",
            Instant::now(),
        )
        .unwrap();
    assert_eq!(e.shed.map(|s| s.0), Some("l3"));
}

#[test]
fn only_a_newcomer_that_would_be_head_tries_at_once() {
    let mut q = Q::new(limits(16, None));
    assert!(q.leads(&arrival(Batch, "t")), "an empty queue");
    enter(&mut q, &arrival(Normal, "t"), "d");
    assert!(q.leads(&arrival(Interactive, "u")));
    assert!(!q.leads(&arrival(Normal, "t")), "behind its own tenant");
    assert!(!q.leads(&arrival(Batch, "u")));
    // The handoff stage is served on its own.
    assert!(q.leads(&req(Stage::Handoff, Batch, "t", 1)));
}

#[test]
fn a_newcomer_behind_the_head_waits_for_the_same_room() {
    let mut q = Q::new(limits(16, None));
    assert_eq!(q.head_held(Stage::Arrival), Held::DecodeKv);
    let h = q
        .enter(
            &arrival(Normal, "t"),
            Held::PrefillQueue,
            "h",
            Instant::now(),
        )
        .unwrap()
        .id;
    assert_eq!(q.head_held(Stage::Arrival), Held::PrefillQueue);
    q.set_held(h, Held::DecodeKv);
    assert_eq!(q.head_held(Stage::Arrival), Held::DecodeKv);
    q.leave(h, false);
    // With nobody left, the last known reason.
    assert_eq!(q.head_held(Stage::Arrival), Held::DecodeKv);
}

#[test]
fn the_head_leaving_hands_the_turn_on_and_leaving_twice_is_harmless() {
    let mut q = Q::new(limits(16, None));
    let a = enter(&mut q, &arrival(Normal, "t"), "a");
    let b = enter(&mut q, &arrival(Normal, "t"), "b");
    let c = enter(&mut q, &arrival(Normal, "t"), "c");
    assert_eq!(q.leave(b, false), None, "not the head: nobody new to wake");
    assert_eq!(q.leave(a, false), Some("c"));
    assert!(q.is_head(c));
    assert_eq!(q.leave(a, false), None);
    assert!(!q.contains(a));
    assert_eq!(q.len(), 1);
}

#[test]
fn a_full_queue_sheds_the_last_waiter_of_the_lowest_class_below_the_newcomer() {
    let mut q = Q::new(limits(4, None));
    let now = Instant::now();
    for (class, name) in [(Batch, "b1"), (Normal, "d1"), (Batch, "b2"), (Normal, "d2")] {
        enter(&mut q, &arrival(class, "t"), name);
    }
    // Batch has no class below it: refused itself.
    assert_eq!(
        q.enter(&arrival(Batch, "u"), Held::DecodeKv, "x", now)
            .unwrap_err(),
        Refusal::QueueFull
    );
    // Interactive: batch first, the newest batch waiter first.
    let shed = |q: &mut Q| {
        q.enter(&arrival(Interactive, "u"), Held::DecodeKv, "i", now)
            .unwrap()
            .shed
    };
    assert_eq!(shed(&mut q), Some(("b2", Batch)));
    assert_eq!(shed(&mut q), Some(("b1", Batch)));
    // Then default, the one that would be admitted last.
    assert_eq!(shed(&mut q), Some(("d2", Normal)));
    // A default newcomer finds no batch to shed.
    assert_eq!(
        q.enter(&arrival(Normal, "u"), Held::DecodeKv, "x", now)
            .unwrap_err(),
        Refusal::QueueFull
    );
    assert_eq!(q.len(), 4);
    assert_eq!(q.waiting(Interactive), 3);
    assert_eq!(q.peak(), 4);
}

#[test]
fn shedding_can_be_switched_off_and_never_takes_a_finished_prefill() {
    let mut off = limits(1, None);
    off.shed = false;
    let mut q = Q::new(off);
    enter(&mut q, &arrival(Batch, "t"), "b");
    assert_eq!(
        q.enter(
            &arrival(Interactive, "u"),
            Held::DecodeKv,
            "i",
            Instant::now()
        )
        .unwrap_err(),
        Refusal::QueueFull
    );

    let mut q = Q::new(limits(1, None));
    enter(&mut q, &req(Stage::Handoff, Batch, "t", 1), "handoff");
    assert_eq!(
        q.enter(
            &arrival(Interactive, "u"),
            Held::DecodeKv,
            "i",
            Instant::now()
        )
        .unwrap_err(),
        Refusal::QueueFull
    );
}

#[test]
fn shedding_for_the_other_stage_wakes_the_arrival_head_it_exposes() {
    let mut q = Q::new(limits(2, None));
    enter(&mut q, &arrival(Batch, "t"), "b-head");
    let next = enter(&mut q, &arrival(Batch, "t"), "b-next");
    // The newest batch arrival is shed, which is not the head: nobody to wake.
    let e = q
        .enter(
            &req(Stage::Handoff, Interactive, "u", 1),
            Held::DecodeKv,
            "h1",
            Instant::now(),
        )
        .unwrap();
    assert_eq!(e.shed.map(|s| s.0), Some("b-next"));
    assert_eq!(e.new_head, None);
    assert!(!q.contains(next));
    // Now the head itself goes: the stage has nobody left to wake.
    let e = q
        .enter(
            &req(Stage::Handoff, Interactive, "u", 1),
            Held::DecodeKv,
            "h2",
            Instant::now(),
        )
        .unwrap();
    assert_eq!(e.shed.map(|s| s.0), Some("b-head"));
    assert_eq!(e.new_head, None);

    let mut q = Q::new(limits(3, None));
    enter(&mut q, &arrival(Normal, "t"), "d-head");
    enter(&mut q, &arrival(Batch, "t"), "b");
    enter(&mut q, &arrival(Batch, "t"), "b2");
    let e = q
        .enter(
            &req(Stage::Handoff, Normal, "u", 1),
            Held::DecodeKv,
            "h",
            Instant::now(),
        )
        .unwrap();
    assert_eq!(e.shed.map(|s| s.0), Some("b2"));
}

#[test]
fn a_tenant_may_not_fill_the_queue_past_its_share() {
    let mut q = Q::new(limits(8, Some(2)));
    let now = Instant::now();
    enter(&mut q, &arrival(Normal, "greedy"), "g1");
    let g2 = enter(&mut q, &req(Stage::Handoff, Normal, "greedy", 1), "g2");
    // Both stages count.
    assert_eq!(
        q.enter(&arrival(Interactive, "greedy"), Held::DecodeKv, "g3", now)
            .unwrap_err(),
        Refusal::TenantQueueFull
    );
    enter(&mut q, &arrival(Normal, "other"), "o1");
    q.leave(g2, true);
    enter(&mut q, &arrival(Normal, "greedy"), "g3");
}

#[test]
fn each_class_has_its_own_deadline() {
    let mut q = Q::new(limits(8, None));
    let t0 = Instant::now();
    let deadline = |q: &mut Q, class| {
        q.enter(&arrival(class, "t"), Held::DecodeKv, "x", t0)
            .unwrap()
            .deadline
    };
    assert_eq!(
        [Interactive, Normal, Batch].map(|c| deadline(&mut q, c) - t0),
        [1_000, 5_000, 30_000].map(Duration::from_millis)
    );
    // A month at most: an `Instant` cannot overflow.
    let cfg = AdmissionConfig {
        batch_max_wait_ms: u64::MAX,
        ..AdmissionConfig::default()
    };
    let l = Limits::from_config(&cfg);
    assert_eq!(l.max_wait[2], Duration::from_secs(30 * 86_400));
    assert_eq!(l.max_wait[0], Duration::from_millis(2_000));
}

#[test]
fn random_traffic_never_exceeds_a_bound_and_heads_are_always_first() {
    let mut rng = ChaCha8Rng::seed_from_u64(17);
    let mut q = Q::new(limits(32, Some(12)));
    let tenants = ["a", "b", "c", "d"];
    let mut live: Vec<(u64, &str)> = Vec::new();
    let mut per_class_seen = [0usize; 3];
    for step in 0..20_000 {
        if rng.random_bool(0.55) {
            let t = tenants[rng.random_range(0..4)];
            let class = CLASSES[rng.random_range(0..3)];
            let stage = if rng.random_bool(0.2) {
                Stage::Handoff
            } else {
                Stage::Arrival
            };
            let r = Request {
                stage,
                class,
                tenant: t.into(),
                weight: rng.random_range(1..=4),
                cost: rng.random_range(1..200),
            };
            if rng.random_bool(0.1) && q.leads(&r) {
                q.charge(&r);
                continue;
            }
            match q.enter(&r, Held::DecodeKv, "x", Instant::now()) {
                Ok(e) => {
                    live.push((e.id, t));
                    per_class_seen[rank(class)] += 1;
                }
                Err(Refusal::QueueFull) => assert_eq!(q.len(), 32, "step {step}"),
                Err(Refusal::TenantQueueFull) => {
                    assert_eq!(live.iter().filter(|(_, x)| *x == t).count(), 12)
                }
                Err(other) => panic!("{other:?}"),
            }
        } else if !live.is_empty() {
            let (id, _) = live.swap_remove(rng.random_range(0..live.len()));
            let was_head = q.is_head(id);
            let next = q.leave(id, rng.random_bool(0.7));
            assert!(next.is_none() || was_head);
        }
        live.retain(|(id, _)| q.contains(*id));
        assert!(q.len() <= 32);
        assert_eq!(q.len(), live.len());
        assert_eq!(
            CLASSES.iter().map(|c| q.waiting(*c)).sum::<usize>(),
            q.len()
        );
        for t in tenants {
            assert!(live.iter().filter(|(_, x)| *x == t).count() <= 12);
        }
        for stage in [Stage::Arrival, Stage::Handoff] {
            if let Some(&h) = q.ids(stage).first() {
                assert!(q.is_head(h));
            }
        }
    }
    assert!(q.peak() <= 32);
    assert!(
        per_class_seen.iter().all(|n| *n > 100),
        "{per_class_seen:?}"
    );
}

// --- The waiting edge, under paused time. ---

/// Room for `n` more requests; every release notifies `freed`, as the pool's guards do.
struct Room {
    free: AtomicU64,
    freed: Notify,
    _pools: watch::Sender<u32>,
    rx: watch::Receiver<u32>,
}

impl Room {
    fn new(n: u64) -> Arc<Room> {
        let (pools, rx) = watch::channel(0);
        Arc::new(Room {
            free: AtomicU64::new(n),
            freed: Notify::new(),
            _pools: pools,
            rx,
        })
    }

    fn release(&self, n: u64) {
        self.free.fetch_add(n, Ordering::AcqRel);
        self.freed.notify_waiters();
    }
}

fn adm(max_queued: u32, per_tenant: Option<u32>) -> Admission {
    let cfg = AdmissionConfig {
        max_queued,
        max_queued_per_tenant: per_tenant,
        interactive_max_wait_ms: 1_000,
        max_wait_ms: 5_000,
        batch_max_wait_ms: 30_000,
        ..AdmissionConfig::default()
    };
    Admission::new(&cfg, Arc::new(Metrics::new(None, true)))
}

fn who(class: Priority, tenant: &str) -> Who {
    Who {
        tenant: tenant.into(),
        class,
        weight: 1,
        group: "default".into(),
    }
}

/// Wait for one unit of room, recording the order admissions happen in.
async fn take(
    adm: &Admission,
    room: &Room,
    w: Who,
    log: &Mutex<Vec<String>>,
    name: &str,
) -> Result<(), String> {
    let r = wait_for_room(adm, &room.rx, &room.freed, &w, Stage::Arrival, 1, |_| {
        let ok = room
            .free
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok();
        Ok(if ok { Ok(()) } else { Err(Held::DecodeKv) })
    })
    .await;
    match r {
        Ok(()) => {
            log.lock().unwrap().push(name.to_string());
            Ok(())
        }
        Err(RouteError::Refused(e)) => Err(e.to_string()),
        Err(RouteError::Plan(e)) => Err(format!("{e:?}")),
    }
}

fn metric(adm: &Admission, name: &str, labels: &[&str]) -> f64 {
    adm.metrics
        .encode()
        .lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|x| l.contains(x)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Let every spawned task run until it waits.
async fn settle() {
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn freed_room_goes_to_the_next_waiter_in_order_not_the_first_to_wake() {
    let adm = Arc::new(adm(16, None));
    let room = Room::new(0);
    let log = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for (class, name) in [
        (Batch, "b1"),
        (Normal, "d1"),
        (Batch, "b2"),
        (Interactive, "i1"),
        (Normal, "d2"),
    ] {
        let (adm, room, log) = (adm.clone(), room.clone(), log.clone());
        tasks.push(tokio::spawn(async move {
            take(&adm, &room, who(class, name), &log, name).await
        }));
        settle().await;
    }
    assert_eq!(adm.waiting(), 5);
    assert_eq!(metric(&adm, "tandem_admission_waiting{", &["batch"]), 2.0);
    // One unit at a time: each goes to the head.
    for _ in 0..5 {
        room.release(1);
        settle().await;
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(*log.lock().unwrap(), ["i1", "d1", "d2", "b1", "b2"]);
    assert_eq!(adm.waiting(), 0);
    assert_eq!(
        metric(&adm, "tandem_admission_queued_total", &["decode_kv"]),
        5.0
    );
    // Room for three at once goes down the line in one go.
    let log2 = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for name in ["x1", "x2", "x3"] {
        let (adm, room, log) = (adm.clone(), room.clone(), log2.clone());
        tasks.push(tokio::spawn(async move {
            take(&adm, &room, who(Normal, "t"), &log, name).await
        }));
        settle().await;
    }
    room.release(3);
    settle().await;
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(*log2.lock().unwrap(), ["x1", "x2", "x3"]);
}

#[tokio::test(start_paused = true)]
async fn a_newcomer_does_not_take_room_from_those_waiting_ahead_of_it() {
    let adm = Arc::new(adm(16, None));
    let room = Room::new(0);
    let log = Arc::new(Mutex::new(Vec::new()));
    let (a, r, l) = (adm.clone(), room.clone(), log.clone());
    let first = tokio::spawn(async move { take(&a, &r, who(Normal, "t"), &l, "first").await });
    settle().await;
    // Room appears without a release being signalled yet; a newcomer behind does not try.
    room.free.store(1, Ordering::Release);
    let (a, r, l) = (adm.clone(), room.clone(), log.clone());
    let second = tokio::spawn(async move { take(&a, &r, who(Normal, "t"), &l, "second").await });
    settle().await;
    assert!(log.lock().unwrap().is_empty());
    room.release(1);
    settle().await;
    first.await.unwrap().unwrap();
    second.await.unwrap().unwrap();
    assert_eq!(*log.lock().unwrap(), ["first", "second"]);
}

#[tokio::test(start_paused = true)]
async fn a_waiter_whose_client_left_is_taken_out_and_the_next_gets_its_turn() {
    let adm = Arc::new(adm(16, None));
    let room = Room::new(0);
    let log = Arc::new(Mutex::new(Vec::new()));
    let (a, r, l) = (adm.clone(), room.clone(), log.clone());
    let gone = tokio::spawn(async move { take(&a, &r, who(Normal, "t"), &l, "gone").await });
    settle().await;
    let (a, r, l) = (adm.clone(), room.clone(), log.clone());
    let next = tokio::spawn(async move { take(&a, &r, who(Normal, "t"), &l, "next").await });
    settle().await;
    assert_eq!(adm.waiting(), 2);
    // Room appears unsignalled, then the head's client leaves: the next head tries at once.
    room.free.store(1, Ordering::Release);
    gone.abort();
    settle().await;
    assert_eq!(adm.waiting(), 0);
    next.await.unwrap().unwrap();
    assert_eq!(*log.lock().unwrap(), ["next"]);
}

#[tokio::test(start_paused = true)]
async fn each_class_waits_its_own_longest_wait() {
    let adm = Arc::new(adm(16, None));
    let room = Room::new(0);
    let log = Arc::new(Mutex::new(Vec::new()));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for class in [Interactive, Normal, Batch] {
        let (a, r, l) = (adm.clone(), room.clone(), log.clone());
        tasks.push(tokio::spawn(async move {
            let e = take(&a, &r, who(class, class.as_str()), &l, "x").await;
            (e, start.elapsed())
        }));
    }
    let mut waited = Vec::new();
    for t in tasks {
        let (e, d) = t.await.unwrap();
        let msg = e.unwrap_err();
        assert!(
            msg.contains("no decode engine had KV room within admission."),
            "{msg}"
        );
        waited.push(d);
    }
    assert_eq!(
        waited,
        [1_000, 5_000, 30_000].map(Duration::from_millis),
        "interactive, default, batch"
    );
    assert_eq!(
        metric(&adm, "tandem_admission_rejected_total", &["deadline"]),
        3.0
    );
}

#[tokio::test(start_paused = true)]
async fn a_full_queue_sheds_batch_for_interactive_and_counts_every_refusal() {
    let adm = Arc::new(adm(2, Some(2)));
    let room = Room::new(0);
    let log = Arc::new(Mutex::new(Vec::new()));
    let spawn = |class, tenant: &'static str| {
        let (a, r, l) = (adm.clone(), room.clone(), log.clone());
        tokio::spawn(async move { take(&a, &r, who(class, tenant), &l, tenant).await })
    };
    let b1 = spawn(Batch, "bulk");
    settle().await;
    let b2 = spawn(Batch, "bulk");
    settle().await;
    // The tenant's share and the queue are both full.
    let b3 = spawn(Batch, "bulk").await.unwrap().unwrap_err();
    assert!(b3.contains("max_queued_per_tenant"), "{b3}");
    // Another batch tenant has nobody lower to shed.
    let other = spawn(Batch, "team").await.unwrap().unwrap_err();
    assert!(other.contains("admission queue is full"), "{other}");
    // Interactive takes the newest batch waiter's place.
    let i = spawn(Interactive, "chat");
    settle().await;
    let shed = b2.await.unwrap().unwrap_err();
    assert!(shed.contains("higher priority class"), "{shed}");
    room.release(1);
    settle().await;
    i.await.unwrap().unwrap();
    room.release(1);
    b1.await.unwrap().unwrap();
    assert_eq!(*log.lock().unwrap(), ["chat", "bulk"]);
    for (labels, n) in [
        (["\"batch\"", "tenant_queue_full"], 1.0),
        (["\"batch\"", "\"queue_full\""], 1.0),
        (["\"batch\"", "\"shed\""], 1.0),
    ] {
        assert_eq!(
            metric(&adm, "tandem_admission_rejected_total", &labels),
            n,
            "{labels:?}"
        );
    }
    assert_eq!(metric(&adm, "tandem_admission_waiting_peak", &[]), 2.0);
}

#[tokio::test(start_paused = true)]
async fn the_pool_table_going_away_ends_the_wait() {
    let adm = adm(16, None);
    let (tx, rx) = watch::channel(0u32);
    let freed = Notify::new();
    let w = who(Normal, "t");
    let wait = wait_for_room(&adm, &rx, &freed, &w, Stage::Arrival, 1, |_| {
        Ok(Err::<(), _>(Held::DecodeKv))
    });
    // The control loop's sender gone (shutdown): no engine will ever have room.
    let gone = async {
        settle().await;
        drop(tx);
        std::future::pending::<()>().await
    };
    let r = tokio::select! {
        r = wait => r,
        () = gone => unreachable!(),
    };
    assert!(matches!(
        r,
        Err(RouteError::Plan(PlanError::NoDecodeEngine))
    ));
    assert_eq!(adm.waiting(), 0);
}
