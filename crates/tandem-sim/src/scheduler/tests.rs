use super::*;
use crate::kv_cache::none_hash;
use crate::kv_events::KvEvent;

fn config(blocks: u32, budget: usize, max_seqs: usize) -> SchedulerConfig {
    SchedulerConfig {
        max_num_seqs: max_seqs,
        max_num_batched_tokens: budget,
        block_size: 4,
        num_gpu_blocks: blocks,
        root_hash: none_hash("0"),
        enable_prefix_caching: true,
        num_host_blocks: 0,
        kv_content: true,
    }
}

fn sched(blocks: u32, budget: usize, max_seqs: usize) -> Scheduler {
    Scheduler::new(config(blocks, budget, max_seqs))
}

fn sched_with_host(gpu_blocks: u32, host_blocks: u32) -> Scheduler {
    Scheduler::new(SchedulerConfig {
        num_host_blocks: host_blocks,
        ..config(gpu_blocks, 64, 16)
    })
}

/// Runs one sequence to its end (one output token) and returns the step events.
fn run_to_end(s: &mut Scheduler, id: SeqId, prompt: Vec<u32>) -> (StepPlan, Vec<KvEvent>) {
    s.add(seq(id, prompt, 1));
    let (plan, out) = run_step(s);
    assert!(out[0].finished.is_some(), "one step prefills and finishes");
    (plan, s.take_events())
}

/// Hashes of the `BlockStored` (or, with `stored` false, `BlockRemoved`) events for `medium`.
fn hashes_in(events: &[KvEvent], stored: bool, medium: &str) -> Vec<u64> {
    events
        .iter()
        .filter_map(|e| match e {
            KvEvent::BlockStored {
                block_hashes,
                medium: Some(m),
                ..
            } if stored && m == medium => Some(block_hashes.clone()),
            KvEvent::BlockRemoved {
                block_hashes,
                medium: Some(m),
            } if !stored && m == medium => Some(block_hashes.clone()),
            _ => None,
        })
        .flatten()
        .collect()
}

fn stored_in(events: &[KvEvent], medium: &str) -> Vec<u64> {
    hashes_in(events, true, medium)
}

fn removed_in(events: &[KvEvent], medium: &str) -> Vec<u64> {
    hashes_in(events, false, medium)
}

/// vLLM's CPU offloading: blocks cached on the GPU are written through to the host tier; once the
/// GPU has evicted them, a later request finds them there, loads them instead of recomputing,
/// and reports them as cached.
#[test]
fn host_tier_serves_what_the_gpu_evicted() {
    // Four GPU blocks: each 16-token prompt takes all of them.
    let mut s = sched_with_host(4, 100);
    let a: Vec<u32> = (0..16).collect();
    let (_, ev) = run_to_end(&mut s, 1, a.clone());
    let a_hashes = stored_in(&ev, "GPU");
    assert_eq!(a_hashes.len(), 4);
    assert_eq!(
        stored_in(&ev, "CPU"),
        a_hashes,
        "written through, same hashes"
    );
    // An unrelated prompt evicts all of A from the GPU, not from the host.
    let (_, ev) = run_to_end(&mut s, 2, (100..116).collect());
    let mut gone = removed_in(&ev, "GPU");
    gone.sort_unstable();
    let mut want = a_hashes.clone();
    want.sort_unstable();
    assert_eq!(gone, want);
    assert!(removed_in(&ev, "CPU").is_empty());

    // A's first three blocks plus a token: no GPU hit, three blocks from the host.
    let mut c = a[..12].to_vec();
    c.push(200);
    s.add(seq(3, c, 1));
    let plan = s.schedule();
    assert_eq!(plan.prefix_hits, 0);
    assert_eq!((plan.external_queries, plan.external_hits), (13, 12));
    // The copy runs beside the steps: nothing of C is computed while it loads, and its blocks
    // are not in the GPU prefix cache yet.
    assert_eq!(plan.host_loads, vec![HostLoad { id: 3, tokens: 12 }]);
    assert!(plan.scheduled.is_empty(), "{:?}", plan.scheduled);
    assert!(stored_in(&s.take_events(), "GPU").is_empty());
    assert!(s.schedule().is_empty(), "a loading sequence waits");
    assert!(s.host_load_done(3));
    // The loaded blocks join the GPU prefix cache under their old hashes.
    assert_eq!(stored_in(&s.take_events(), "GPU"), a_hashes[..3]);
    let plan = s.schedule();
    assert_eq!((plan.scheduled[0].start, plan.scheduled[0].len), (12, 1));
    assert!(plan.host_loads.is_empty());
}

/// A sequence loading from the host does not hold up others: they run in the steps meanwhile.
#[test]
fn a_host_load_does_not_stall_the_batch() {
    let mut s = sched_with_host(4, 100);
    let a: Vec<u32> = (0..16).collect();
    run_to_end(&mut s, 1, a.clone());
    run_to_end(&mut s, 2, (100..116).collect());
    let mut c = a[..12].to_vec();
    c.push(200);
    s.add(seq(3, c, 1));
    s.add(seq(4, vec![7, 8, 9], 2));
    let plan = s.schedule();
    assert_eq!(plan.host_loads.len(), 1);
    let ids: Vec<SeqId> = plan.scheduled.iter().map(|x| x.id).collect();
    assert_eq!(ids, vec![4], "the other sequence runs while 3 loads");
    // Aborted mid-load: its blocks are freed, and a late completion is ignored.
    assert!(s.abort(3));
    assert!(!s.host_load_done(3));
}

/// The host tier is an LRU of its own size; what it evicts is announced with medium "CPU".
#[test]
fn host_tier_evicts_least_recently_used_with_cpu_events() {
    let mut s = sched_with_host(100, 4);
    let (_, ev) = run_to_end(&mut s, 1, (0..16).collect());
    let a_hashes = stored_in(&ev, "CPU");
    let (_, ev) = run_to_end(&mut s, 2, (100..116).collect());
    assert_eq!(stored_in(&ev, "CPU").len(), 4);
    assert_eq!(removed_in(&ev, "CPU"), a_hashes, "oldest first");
    assert_eq!(s.pool().host().map(|h| h.len()), Some(4));
    // A is still on the GPU: a GPU hit, and the host is not asked for those blocks.
    let mut c: Vec<u32> = (0..16).collect();
    c.push(1);
    s.add(seq(3, c, 1));
    let plan = s.schedule();
    assert_eq!(plan.prefix_hits, 16);
    assert_eq!(plan.external_hits, 0);
    assert!(plan.host_loads.is_empty());
}

fn seq(id: SeqId, prompt: Vec<u32>, max_tokens: usize) -> NewSeq {
    NewSeq {
        id,
        prompt: prompt.into(),
        max_tokens,
        remote_prefill: false,
        remote_decode: false,
    }
}

/// Always sample token 7, never stop early.
fn run_step(s: &mut Scheduler) -> (StepPlan, Vec<StepOutput>) {
    let plan = s.schedule();
    let out = s.complete(&plan, &mut |_, _, _| (7, None));
    (plan, out)
}

#[test]
fn chunked_prefill_respects_the_token_budget_then_decodes() {
    let mut s = sched(100, 8, 16);
    s.add(seq(1, (0..20).collect(), 2));
    let (p, out) = run_step(&mut s);
    assert_eq!(
        p.scheduled,
        vec![Scheduled {
            id: 1,
            start: 0,
            len: 8,
            samples: false,
            is_decode: false
        }]
    );
    assert!(out.is_empty());
    let (p, _) = run_step(&mut s);
    assert_eq!((p.scheduled[0].start, p.scheduled[0].len), (8, 8));
    let (p, out) = run_step(&mut s);
    assert_eq!(
        (
            p.scheduled[0].start,
            p.scheduled[0].len,
            p.scheduled[0].samples
        ),
        (16, 4, true)
    );
    assert_eq!(
        out,
        vec![StepOutput {
            id: 1,
            token: 7,
            finished: None
        }]
    );
    let (p, out) = run_step(&mut s);
    assert!(p.scheduled[0].is_decode);
    assert_eq!(
        out[0].finished.as_ref().unwrap().reason,
        FinishReason::Length
    );
    assert_eq!(s.num_running(), 0);
    assert_eq!(s.kv_usage(), 0.0);
}

#[test]
fn max_num_seqs_caps_the_running_set() {
    let mut s = sched(100, 1000, 2);
    for id in 1..=3 {
        s.add(seq(id, vec![1, 2, 3], 4));
    }
    let (p, _) = run_step(&mut s);
    assert_eq!(p.scheduled.len(), 2);
    assert_eq!(s.num_waiting(), (1, 0));
}

#[test]
fn running_out_of_blocks_preempts_the_latest_sequence() {
    // 4 blocks of 4 tokens; two sequences of 7 prompt tokens take 2 blocks each, then both
    // need a third block to keep decoding.
    let mut s = sched(4, 1000, 8);
    s.add(seq(1, (0..7).collect(), 10));
    s.add(seq(2, (100..107).collect(), 10));
    run_step(&mut s); // prefill both (8 tokens of KV reserved each)
    run_step(&mut s); // decode: position 8 still fits
    let (p, _) = run_step(&mut s);
    assert_eq!(p.preempted, vec![2]);
    assert_eq!(s.num_preemptions(), 1);
    assert_eq!(
        p.scheduled.iter().map(|x| x.id).collect::<Vec<_>>(),
        vec![1]
    );
    assert_eq!(s.num_waiting(), (1, 0));
}

#[test]
fn prefix_hits_skip_computation_but_always_recompute_the_last_token() {
    let mut s = sched(100, 1000, 8);
    let prompt: Vec<u32> = (0..12).collect();
    s.add(seq(1, prompt.clone(), 1));
    let (p, _) = run_step(&mut s);
    assert_eq!((p.prefix_queries, p.prefix_hits), (12, 0));
    s.add(seq(2, prompt.clone(), 1));
    let (p, _) = run_step(&mut s);
    // 12 tokens = 3 full blocks; the last one is recomputed to sample from it.
    assert_eq!((p.prefix_queries, p.prefix_hits), (12, 8));
    assert_eq!((p.scheduled[0].start, p.scheduled[0].len), (8, 4));
    let mut longer = prompt.clone();
    longer.extend([50, 51, 52, 53, 54]);
    s.add(seq(3, longer, 1));
    let (p, _) = run_step(&mut s);
    assert_eq!(p.prefix_hits, 12);
}

#[test]
fn prefill_role_pins_blocks_until_released() {
    let mut s = sched(10, 1000, 8);
    let mut n = seq(1, (0..10).collect(), 1);
    n.remote_decode = true;
    s.add(n);
    let (_, out) = run_step(&mut s);
    let fin = out[0].finished.clone().unwrap();
    assert_eq!(fin.reason, FinishReason::Length);
    let pinned = fin.pinned_blocks.unwrap();
    assert_eq!(pinned.len(), 3);
    assert!(s.is_pinned(1));
    assert!((s.kv_usage() - 0.3).abs() < 1e-9);
    assert!(s.release_pinned(1));
    assert!(!s.release_pinned(1));
    assert_eq!(s.kv_usage(), 0.0);
}

#[test]
fn prefill_role_that_stops_early_frees_blocks_at_once() {
    let mut s = sched(10, 1000, 8);
    let mut n = seq(1, (0..10).collect(), 1);
    n.remote_decode = true;
    s.add(n);
    let plan = s.schedule();
    let out = s.complete(&plan, &mut |_, _, _| (0, Some(FinishReason::Stop)));
    assert_eq!(out[0].finished.as_ref().unwrap().pinned_blocks, None);
    assert_eq!(s.kv_usage(), 0.0);
}

/// A decode-role sequence that is preempted after its KV arrived is recomputed locally, as vLLM
/// does (the connector's `do_remote_prefill` is spent once the load starts): it never asks the
/// prefill engine for the same KV twice, whatever it has generated since.
#[test]
fn a_preempted_decode_role_sequence_recomputes_locally() {
    let mut s = sched(6, 1000, 8);
    s.add(seq(1, (0..5).collect(), 15));
    let mut remote = seq(2, (100..105).collect(), 15);
    remote.remote_prefill = true;
    s.add(remote);
    let (mut transfers, mut preempted, mut finished) = (0, 0, 0);
    for _ in 0..400 {
        let plan = s.schedule();
        transfers += plan.transfers.iter().filter(|t| t.id == 2).count();
        preempted += plan.preempted.iter().filter(|&&id| id == 2).count();
        if plan.transfers.iter().any(|t| t.id == 2) {
            assert!(s.remote_kv_done(2));
        }
        let out = s.complete(&plan, &mut |_, _, _| (7, None));
        finished += out.iter().filter(|o| o.finished.is_some()).count();
        if finished == 2 {
            break;
        }
    }
    assert!(preempted > 0, "the pool is too small for both");
    assert_eq!((transfers, finished), (1, 2));
}

#[test]
fn decode_role_waits_deferred_for_remote_kv_then_samples_from_the_last_token() {
    let mut s = sched(10, 1000, 8);
    let mut n = seq(1, (0..10).collect(), 3);
    n.remote_prefill = true;
    s.add(n);
    let p = s.schedule();
    assert!(p.scheduled.is_empty());
    assert_eq!(
        p.transfers,
        vec![TransferStart {
            id: 1,
            local_hit_blocks: 0,
            prompt_blocks: 3
        }]
    );
    assert_eq!(s.num_waiting(), (0, 1), "deferred while KV is pulled");
    assert!(s.schedule().is_empty(), "nothing to do until the KV lands");
    assert_eq!(s.expected_prompt_contents(1).unwrap().len(), 3);
    assert!(s.remote_kv_done(1));
    let (p, out) = run_step(&mut s);
    assert_eq!(
        (
            p.scheduled[0].start,
            p.scheduled[0].len,
            p.scheduled[0].samples
        ),
        (9, 1, true)
    );
    assert_eq!(out.len(), 1);
    // Block contents were written for what arrived.
    let blocks = s.blocks_of(1).unwrap().to_vec();
    let want = s.expected_prompt_contents(1).unwrap();
    for (b, w) in blocks.iter().zip(&want) {
        assert_eq!(s.block_content(*b), Some(*w));
    }
}

#[test]
fn decode_role_recompute_prefills_locally() {
    let mut s = sched(10, 1000, 8);
    let mut n = seq(1, (0..10).collect(), 1);
    n.remote_prefill = true;
    s.add(n);
    s.schedule();
    assert!(s.remote_kv_recompute(1));
    let (p, out) = run_step(&mut s);
    assert_eq!((p.scheduled[0].start, p.scheduled[0].len), (0, 10));
    assert_eq!(
        out[0].finished.as_ref().unwrap().reason,
        FinishReason::Length
    );
}

#[test]
fn abort_frees_blocks_wherever_the_sequence_is() {
    let mut s = sched(10, 4, 8);
    s.add(seq(1, (0..10).collect(), 5));
    run_step(&mut s);
    assert!(s.kv_usage() > 0.0);
    assert!(s.abort(1));
    assert!(!s.abort(1));
    assert_eq!(s.kv_usage(), 0.0);
    assert_eq!(s.num_running(), 0);
}

/// Without KV content (the fleet's setting) a scheduler decides exactly as with it: the same
/// plans, outputs and KV events over prefix hits, chunking and decode; only the content digests
/// (the stand-in for bytes, which the side channel serves) are not kept.
#[test]
fn kv_content_changes_nothing_the_scheduler_decides() {
    let mut with = sched(40, 12, 4);
    let mut without = Scheduler::new(SchedulerConfig {
        kv_content: false,
        ..config(40, 12, 4)
    });
    let shared: Vec<u32> = (0..18).collect();
    for s in [&mut with, &mut without] {
        s.add(seq(1, shared.clone(), 3));
        s.add(seq(2, [shared.clone(), vec![90, 91, 92]].concat(), 5));
        s.add(seq(3, (50..61).collect(), 2));
    }
    let mut written = 0;
    for _ in 0..40 {
        let (pa, oa) = run_step(&mut with);
        let (pb, ob) = run_step(&mut without);
        assert_eq!(format!("{pa:?}"), format!("{pb:?}"));
        assert_eq!(format!("{oa:?}"), format!("{ob:?}"));
        assert_eq!(
            format!("{:?}", with.take_events()),
            format!("{:?}", without.take_events())
        );
        for b in 0..40 {
            written += usize::from(with.block_content(b).is_some());
            assert_eq!(without.block_content(b), None);
        }
    }
    assert!(written > 0, "the scheduler with content wrote some");
}
