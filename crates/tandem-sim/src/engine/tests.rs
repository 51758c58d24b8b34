//! The engine under paused tokio time: TTFT and ITL as the scheduler and the cost model produce
//! them together (perf-model.md §2.4), measured in simulated seconds.

use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::cost::{CostModel, LinkClass};
use crate::metrics::CacheConfigInfo;
use crate::profile::{GpuKind, Profile};
use crate::scheduler::SchedulerConfig;
use crate::side_channel::CompatFactors;

fn engine(model: &str) -> EngineHandle {
    let profile = Profile::new(model, GpuKind::H100, None).unwrap();
    let blocks = profile.num_gpu_blocks(16);
    let metrics = Arc::new(EngineMetrics::new(
        "m",
        "0",
        profile.model.max_model_len,
        &CacheConfigInfo {
            block_size: 16,
            num_gpu_blocks: blocks,
            gpu_memory_utilization: 0.9,
            cache_dtype: "auto".into(),
            enable_prefix_caching: true,
            prefix_caching_hash_algo: "sha256_cbor".into(),
        },
    ));
    spawn(
        EngineConfig {
            served_model_name: "m".into(),
            cost: CostModel::new(profile.clone()),
            sched: SchedulerConfig {
                max_num_seqs: 256,
                max_num_batched_tokens: 8192,
                block_size: 16,
                num_gpu_blocks: blocks,
                root_hash: crate::kv_cache::none_hash("0"),
                enable_prefix_caching: true,
                num_host_blocks: 0,
                kv_content: true,
            },
            time_scale: 1.0,
            seed: 1,
            eos_ppm: 0,
            engine_id: "e".into(),
            side_channel_host: "127.0.0.1".into(),
            side_channel_port: 1,
            tp_size: 1,
            compat: CompatFactors {
                vllm_version: "v".into(),
                nixl_connector_version: 2,
                model: "m".into(),
                dtype: "bfloat16".into(),
                num_kv_heads: 8,
                head_size: 128,
                num_hidden_layers: 32,
                attn_backend_name: "FLASH_ATTN".into(),
                cache_dtype: "auto".into(),
            },
            abort_timeout: Duration::from_secs(480),
            kv_load_failure_policy: KvLoadFailurePolicy::Fail,
            link: LinkClass::Rdma400,
            side_channel_timeout: Duration::from_secs(5),
            side_client: crate::side_channel::SideChannelClient::new(),
            kv_bytes_per_token: profile.kv_bytes_per_token(),
            nixl: None,
            no_kv_connector: false,
        },
        Arc::new(SimTokenizer::byte_level()),
        metrics,
        None,
        Faults::default(),
    )
}

fn submit(e: &EngineHandle, prompt: Vec<u32>, max_tokens: usize) -> RequestStream {
    e.submit(submit_body(e, prompt, max_tokens))
}

/// (TTFT, mean ITL) of one request, in simulated seconds.
async fn run_one(e: &EngineHandle, mut rs: RequestStream) -> (f64, f64) {
    let start = e.clock().now();
    let mut times = Vec::new();
    while let Some(ev) = rs.rx.recv().await {
        let Event::Token { finish, .. } = ev else {
            panic!("unexpected failure")
        };
        times.push(e.clock().now());
        if finish.is_some() {
            break;
        }
    }
    let ttft = times[0] - start;
    let itl = (times[times.len() - 1] - times[0]) / (times.len() - 1) as f64;
    (ttft, itl)
}

fn prompt(seed: u32, len: usize) -> Vec<u32> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(31) ^ seed) % 256)
        .collect()
}

#[tokio::test(start_paused = true)]
async fn ttft_grows_with_uncached_length_and_shrinks_with_prefix_hits() {
    let e = engine("llama-3.1-8b");
    let (t1k, _) = run_one(&e, submit(&e, prompt(1, 1024), 2)).await;
    let (t4k, _) = run_one(&e, submit(&e, prompt(2, 4096), 2)).await;
    let (t8k, _) = run_one(&e, submit(&e, prompt(3, 8192), 2)).await;
    assert!(t1k < t4k && t4k < t8k, "{t1k} {t4k} {t8k}");
    // perf-model §2.4: 8B 8k prefill ≈ 253 ms (plus one scheduling step here).
    assert!((0.22..0.30).contains(&t8k), "8k TTFT {t8k}");
    // The same 8k prompt again: all but the last block hit the prefix cache.
    let (t8k_cached, _) = run_one(&e, submit(&e, prompt(3, 8192), 2)).await;
    assert!(t8k_cached < t8k / 5.0, "cached {t8k_cached} vs cold {t8k}");
    // Half cached: a 8k prompt sharing its first 4k with the 4k prompt above.
    let mut half = prompt(2, 4096);
    half.extend(prompt(9, 4096));
    let (t_half, _) = run_one(&e, submit(&e, half, 2)).await;
    assert!(
        t8k_cached < t_half && t_half < t8k,
        "{t8k_cached} < {t_half} < {t8k}"
    );
}

#[tokio::test(start_paused = true)]
async fn itl_grows_with_batch_and_context() {
    let e = engine("llama-3.1-8b");
    let (_, itl_1) = run_one(&e, submit(&e, prompt(1, 1024), 64)).await;
    // perf-model anchor: 8B batch-1 ITL 6-8 ms on H100.
    assert!((0.006..0.008).contains(&itl_1), "batch-1 ITL {itl_1}");

    let streams: Vec<RequestStream> = (0..64)
        .map(|i| submit(&e, prompt(100 + i, 1024), 64))
        .collect();
    // Consume all streams concurrently so each token is timed when the engine emits it.
    let itls: Vec<f64> = futures::future::join_all(streams.into_iter().map(|rs| run_one(&e, rs)))
        .await
        .into_iter()
        .map(|(_, itl)| itl)
        .collect();
    let itl_64 = itls.iter().sum::<f64>() / itls.len() as f64;
    assert!(itl_64 > itl_1 * 1.2, "batch 64 {itl_64} vs batch 1 {itl_1}");

    let (_, itl_long) = run_one(&e, submit(&e, prompt(7, 32_768), 64)).await;
    assert!(itl_long > itl_1, "32k context {itl_long} vs 1k {itl_1}");
}

fn submit_as(
    e: &EngineHandle,
    id: &str,
    prompt: Vec<u32>,
    max_tokens: usize,
    role: Role,
) -> RequestStream {
    e.submit(Submit {
        internal_id: id.into(),
        role,
        ..submit_body(e, prompt, max_tokens)
    })
}

fn submit_body(e: &EngineHandle, prompt: Vec<u32>, max_tokens: usize) -> Submit {
    Submit {
        internal_id: "r".into(),
        prompt: prompt.into(),
        params: SeqParams {
            max_tokens,
            min_tokens: 0,
            ignore_eos: true,
            stop: vec![],
            stop_token_ids: vec![],
            include_stop_str_in_output: false,
            seed: None,
            forced: None,
        },
        n: 1,
        role: Role::Colocated,
        arrival: e.clock().now(),
        force_eos_first: false,
        max_tokens_param: max_tokens as u64,
    }
}

/// The KV handle a prefill-role request ends with.
async fn prefill_handle(e: &EngineHandle, id: &str, prompt: Vec<u32>) -> KvHandle {
    let mut rs = submit_as(e, id, prompt, 1, Role::Prefill);
    loop {
        match rs.rx.recv().await.expect("stream ends with a finish") {
            Event::Token {
                finish: Some(f), ..
            } => return f.kv.expect("a prefill-role request leaves its KV"),
            Event::Token { .. } => {}
            Event::Failed { error, .. } => panic!("{error}"),
        }
    }
}

async fn read(
    side: &tokio::sync::mpsc::Sender<SideRequest>,
    id: &str,
    blocks: &[u32],
) -> Result<Vec<Vec<u8>>, String> {
    let (reply, rx) = tokio::sync::oneshot::channel();
    side.send(SideRequest::Read {
        remote_request_id: id.into(),
        block_ids: blocks.to_vec(),
        grant: false,
        reply,
    })
    .await
    .unwrap();
    rx.await.unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_prefill_engine_answers_reads_while_it_computes() {
    // vLLM's NIXL READs are one-sided: the prefill engine's steps do not hold them up.
    let e = engine("llama-3.1-8b");
    let (side, rx) = tokio::sync::mpsc::channel(16);
    e.serve_side(rx);
    let kv = prefill_handle(&e, "p1", prompt(1, 4096)).await;
    // A long prompt keeps the engine in ~250 ms steps (8k-token chunks of an 8B model).
    let busy = submit(&e, prompt(2, 64 * 1024), 1);
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let t0 = e.clock().now();
    let blocks = read(&side, "p1", &kv.block_ids).await.unwrap();
    let took = e.clock().now() - t0;
    assert_eq!(blocks.len(), kv.block_ids.len());
    // 4k tokens of 8B KV (0.5 GiB) through 400G: ~11 ms, not the rest of a 250 ms step.
    let modeled = 4096.0 * 131_072.0 / 49.5e9;
    assert!(
        took < modeled * 1.2 && took > modeled * 0.8,
        "read took {took} s, modeled {modeled} s"
    );
    drop(busy);
}

#[tokio::test(start_paused = true)]
async fn concurrent_reads_share_the_prefill_engines_nic() {
    let e = engine("llama-3.1-8b");
    let (side, rx) = tokio::sync::mpsc::channel(16);
    e.serve_side(rx);
    let mut handles = Vec::new();
    for i in 0..4 {
        handles.push(prefill_handle(&e, &format!("p{i}"), prompt(10 + i, 4096)).await);
    }
    let t0 = e.clock().now();
    let reads = handles
        .iter()
        .enumerate()
        .map(|(i, kv)| read_timed(&side, format!("p{i}"), kv.block_ids.clone(), e.clock(), t0));
    let took = futures::future::join_all(reads).await;
    // Four reads of b bytes over B: about 4·b/B each (together), not b/B nor a queue.
    let one = 4096.0 * 131_072.0 / 49.5e9;
    for t in &took {
        assert!(
            (t - 4.0 * one).abs() < one * 0.2,
            "{took:?} vs one read {one}"
        );
    }
    // A read for a request whose lease is gone goes through the engine and still answers.
    assert!(read(&side, "unknown", &handles[0].block_ids).await.is_ok());
}

async fn read_timed(
    side: &tokio::sync::mpsc::Sender<SideRequest>,
    id: String,
    blocks: Vec<u32>,
    clock: SimClock,
    t0: f64,
) -> f64 {
    read(side, &id, &blocks).await.unwrap();
    clock.now() - t0
}
