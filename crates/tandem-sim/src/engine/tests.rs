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
        },
        Arc::new(SimTokenizer::byte_level()),
        metrics,
        None,
        Faults::default(),
    )
}

fn submit(e: &EngineHandle, prompt: Vec<u32>, max_tokens: usize) -> RequestStream {
    e.submit(Submit {
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
        },
        n: 1,
        role: Role::Colocated,
        arrival: e.clock().now(),
        force_eos_first: false,
        max_tokens_param: max_tokens as u64,
    })
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
