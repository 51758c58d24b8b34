use super::*;
use crate::kv_cache::none_hash;

fn sched(blocks: u32, budget: usize, max_seqs: usize) -> Scheduler {
    Scheduler::new(SchedulerConfig {
        max_num_seqs: max_seqs,
        max_num_batched_tokens: budget,
        block_size: 4,
        num_gpu_blocks: blocks,
        root_hash: none_hash("0"),
        enable_prefix_caching: true,
    })
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
