use super::*;
use std::collections::BTreeMap;

const MODEL: &str = "test-model";

fn cache() -> CacheConfigInfo {
    CacheConfigInfo {
        block_size: 16,
        num_gpu_blocks: 1000,
        gpu_memory_utilization: 0.9,
        cache_dtype: "auto".to_string(),
        enable_prefix_caching: true,
        prefix_caching_hash_algo: "sha256_cbor".to_string(),
    }
}

fn metrics() -> EngineMetrics {
    EngineMetrics::new(MODEL, "0", 2048, &cache())
}

fn finished(reason: FinishedReason) -> FinishedRequest {
    FinishedRequest {
        reason,
        prompt_tokens: 100,
        generation_tokens: 20,
        max_tokens_param: 0,
        n: 1,
        e2e_s: 1.25,
        queue_s: 0.1,
        prefill_s: 0.2,
        decode_s: 0.95,
        inference_s: 1.15,
        prefill_kv_computed_tokens: 36,
        mean_tpot_s: None,
    }
}

/// A sample: name, labels in output order, value.
type Parsed = (String, Vec<(String, String)>, f64);

fn samples(text: &str) -> Vec<Parsed> {
    let lines = text.lines().filter(|l| !l.starts_with('#'));
    lines
        .map(|l| {
            let s = parse_sample(l).unwrap_or_else(|| panic!("unparseable {l:?}"));
            let labels = s.labels.iter().map(|(k, v)| (k.to_string(), v.to_string()));
            (
                s.name.to_string(),
                labels.collect(),
                s.value.parse().unwrap(),
            )
        })
        .collect()
}

fn label<'a>(labels: &'a [(String, String)], key: &str) -> Option<&'a str> {
    labels
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// The value of the one sample named `name` whose labels include `with`.
fn value(text: &str, name: &str, with: &[(&str, &str)]) -> f64 {
    let hits: Vec<f64> = samples(text)
        .into_iter()
        .filter(|(n, l, _)| n == name && with.iter().all(|(k, v)| label(l, k) == Some(v)))
        .map(|(.., v)| v)
        .collect();
    assert_eq!(hits.len(), 1, "{name} {with:?}: {hits:?}");
    hits[0]
}

fn le_list(text: &str, family: &str) -> Vec<String> {
    let bucket = format!("{family}_bucket");
    let buckets = samples(text).into_iter().filter(|(n, ..)| *n == bucket);
    buckets
        .map(|(_, l, _)| label(&l, "le").unwrap().to_string())
        .collect()
}

/// The spec's list as Python renders `le`, plus `+Inf`.
fn spec(list: &str) -> Vec<String> {
    list.split(", ")
        .map(str::to_string)
        .chain(["+Inf".to_string()])
        .collect()
}

#[rustfmt::skip]
const FAMILIES: [(&str, &str); 36] = [
    ("vllm:num_requests_running", "gauge"), ("vllm:num_requests_waiting", "gauge"),
    ("vllm:num_requests_waiting_by_reason", "gauge"), ("vllm:kv_cache_usage_perc", "gauge"),
    ("vllm:cache_config_info", "gauge"),
    ("vllm:prefix_cache_queries_total", "counter"), ("vllm:prefix_cache_hits_total", "counter"),
    ("vllm:external_prefix_cache_queries_total", "counter"), ("vllm:external_prefix_cache_hits_total", "counter"),
    ("vllm:num_preemptions_total", "counter"), ("vllm:prompt_tokens_total", "counter"),
    ("vllm:generation_tokens_total", "counter"), ("vllm:request_success_total", "counter"),
    ("vllm:nixl_num_failed_transfers_total", "counter"),
    ("vllm:nixl_num_failed_notifications_total", "counter"),
    ("vllm:nixl_num_kv_expired_reqs_total", "counter"),
    ("vllm:request_prompt_tokens", "histogram"), ("vllm:request_generation_tokens", "histogram"),
    ("vllm:iteration_tokens_total", "histogram"),
    ("vllm:request_max_num_generation_tokens", "histogram"),
    ("vllm:request_params_n", "histogram"), ("vllm:request_params_max_tokens", "histogram"),
    ("vllm:time_to_first_token_seconds", "histogram"),
    ("vllm:time_per_output_token_seconds", "histogram"),
    ("vllm:inter_token_latency_seconds", "histogram"),
    ("vllm:request_time_per_output_token_seconds", "histogram"),
    ("vllm:e2e_request_latency_seconds", "histogram"),
    ("vllm:request_queue_time_seconds", "histogram"),
    ("vllm:request_inference_time_seconds", "histogram"),
    ("vllm:request_prefill_time_seconds", "histogram"),
    ("vllm:request_decode_time_seconds", "histogram"),
    ("vllm:request_prefill_kv_computed_tokens", "histogram"),
    ("vllm:nixl_xfer_time_seconds", "histogram"), ("vllm:nixl_post_time_seconds", "histogram"),
    ("vllm:nixl_bytes_transferred", "histogram"), ("vllm:nixl_num_descriptors", "histogram"),
];

#[test]
fn tables_match_their_index_enums() {
    for (i, (c, ..)) in COUNTERS.iter().enumerate() {
        assert_eq!(*c as usize, i, "{c:?}");
    }
    for (i, (h, ..)) in HISTOGRAMS.iter().enumerate() {
        assert_eq!(*h as usize, i, "{h:?}");
    }
}

#[test]
fn families_names_types_and_samples() {
    let text = metrics().encode();
    let lines: Vec<&str> = text.lines().collect();
    let mut types = BTreeMap::new();
    for (i, line) in lines.iter().enumerate() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(
                lines[i - 1].starts_with(&format!("# HELP {name} ")),
                "{line}"
            );
            assert!(types.insert(name, kind).is_none(), "duplicate {name}");
        }
    }
    assert_eq!(types, FAMILIES.into_iter().collect());
    for (name, ..) in samples(&text) {
        // `:` survives verbatim; counters are sampled under their `_total` family name.
        assert!(name.starts_with("vllm:"), "{name}");
        let histogram = ["_bucket", "_sum", "_count"]
            .iter()
            .filter_map(|s| name.strip_suffix(s))
            .any(|base| types.get(base) == Some(&"histogram"));
        assert!(histogram || types.contains_key(name.as_str()), "{name}");
    }
    assert!(!text.contains("# EOF") && !text.contains("_created") && !text.contains("# UNIT"));
    assert!(
        text.contains("# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig\n")
    );
    assert!(text
        .contains("# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.\n"));
    let counter = "\nvllm:prompt_tokens_total{engine=\"0\",model_name=\"test-model\"} 0.0\n";
    assert!(text.contains(counter));
}

#[test]
fn labels_carry_model_name_and_engine_in_vllm_order() {
    let text = metrics().encode();
    for (name, labels, _) in samples(&text) {
        assert_eq!(label(&labels, "engine"), Some("0"), "{name}");
        // vLLM's info gauge has CacheConfig fields + engine only.
        let model = (name != "vllm:cache_config_info").then_some(MODEL);
        assert_eq!(label(&labels, "model_name"), model, "{name}");
        // Multiprocess prometheus_client order: keys sorted, `le` appended last.
        let keys: Vec<&str> = labels.iter().map(|(k, _)| k.as_str()).collect();
        let mut expected: Vec<&str> = keys.iter().copied().filter(|k| *k != "le").collect();
        expected.sort_unstable();
        expected.extend(keys.iter().copied().filter(|k| *k == "le"));
        assert_eq!(keys, expected, "{name}");
    }
    let bucket = "vllm:time_to_first_token_seconds_bucket{engine=\"0\",model_name=\"test-model\",le=\"0.001\"} 0.0\n";
    assert!(text.contains(bucket));
    let success = "vllm:request_success_total{engine=\"0\",finished_reason=\"stop\",model_name=\"test-model\"} 0.0\n";
    assert!(text.contains(success));
}

#[test]
fn bucket_lists_match_the_spec() {
    let text = metrics().encode();
    let ttft = spec("0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0");
    assert_eq!(le_list(&text, "vllm:time_to_first_token_seconds"), ttft);
    let itl = spec("0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0");
    for f in [
        "inter_token_latency",
        "time_per_output_token",
        "request_time_per_output_token",
    ] {
        assert_eq!(le_list(&text, &format!("vllm:{f}_seconds")), itl, "{f}");
    }
    let latency = spec("0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0");
    for f in [
        "e2e_request_latency",
        "request_queue_time",
        "request_inference_time",
    ] {
        assert_eq!(le_list(&text, &format!("vllm:{f}_seconds")), latency, "{f}");
    }
    for f in ["request_prefill_time", "request_decode_time"] {
        assert_eq!(le_list(&text, &format!("vllm:{f}_seconds")), latency, "{f}");
    }
    // build_1_2_5_buckets(max_model_len = 2048).
    let len = spec("1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0");
    for f in [
        "prompt_tokens",
        "generation_tokens",
        "max_num_generation_tokens",
    ] {
        assert_eq!(le_list(&text, &format!("vllm:request_{f}")), len, "{f}");
    }
    for f in ["params_max_tokens", "prefill_kv_computed_tokens"] {
        assert_eq!(le_list(&text, &format!("vllm:request_{f}")), len, "{f}");
    }
    let n = spec("1.0, 2.0, 5.0, 10.0, 20.0");
    assert_eq!(le_list(&text, "vllm:request_params_n"), n);
    let iteration = spec(
        "1.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0",
    );
    assert_eq!(le_list(&text, "vllm:iteration_tokens_total"), iteration);
    // Python's floatToGoString switches to exponents past six integer digits.
    let bytes = le_list(&text, "vllm:nixl_bytes_transferred");
    assert_eq!(
        [&bytes[0], &bytes[5], &bytes[11]],
        ["2048.0", "2.097152e+06", "8.589934592e+09"]
    );
    assert_eq!(le_list(&text, "vllm:nixl_xfer_time_seconds")[0], "0.005");
    assert_eq!(le_list(&text, "vllm:nixl_post_time_seconds")[0], "0.001");
}

#[test]
fn one_two_five_buckets() {
    assert_eq!(build_1_2_5_buckets(100), [1, 2, 5, 10, 20, 50, 100]);
    assert_eq!(build_1_2_5_buckets(99), [1, 2, 5, 10, 20, 50]);
    assert!(build_1_2_5_buckets(0).is_empty());
    assert_eq!(build_1_2_5_buckets(131_072).last(), Some(&100_000));
    assert_eq!(build_1_2_5_buckets(u64::MAX).len(), 58);
}

#[test]
fn cache_config_info_labels() {
    let text = metrics().encode();
    let info: Vec<_> = samples(&text)
        .into_iter()
        .filter(|(n, ..)| n == "vllm:cache_config_info")
        .map(|(_, labels, v)| (labels, v))
        .collect();
    #[rustfmt::skip]
    let expected = [
        ("block_size", "16"), ("cache_dtype", "auto"), ("enable_prefix_caching", "True"),
        ("engine", "0"), ("gpu_memory_utilization", "0.9"), ("num_gpu_blocks", "1000"),
        ("prefix_caching_hash_algo", "sha256_cbor"),
    ];
    let expected = expected
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .to_vec();
    assert_eq!(info, [(expected, 1.0)]);
}

#[test]
fn scheduler_gauges_and_waiting_by_reason_sum() {
    let m = metrics();
    let g = SchedulerGauges {
        running: 7,
        waiting_capacity: 3,
        waiting_deferred: 2,
        kv_cache_usage: 0.625,
    };
    m.set_scheduler(g);
    let text = m.encode();
    let by = |reason| {
        value(
            &text,
            "vllm:num_requests_waiting_by_reason",
            &[("reason", reason)],
        )
    };
    let waiting = value(&text, "vllm:num_requests_waiting", &[]);
    assert_eq!((waiting, by("capacity"), by("deferred")), (5.0, 3.0, 2.0));
    assert_eq!(value(&text, "vllm:num_requests_running", &[]), 7.0);
    assert_eq!(value(&text, "vllm:kv_cache_usage_perc", &[]), 0.625);
    // Exactly the two reasons, in a stable order.
    let family = samples(&text)
        .into_iter()
        .filter(|(n, ..)| n.ends_with("_by_reason"));
    let reasons: Vec<String> = family
        .map(|(_, l, _)| label(&l, "reason").unwrap().into())
        .collect();
    assert_eq!(reasons, ["capacity", "deferred"]);
}

#[test]
fn request_finished_counts_by_reason_and_observes_histograms() {
    let m = metrics();
    let success = |text: &str, reason: &str| {
        value(
            text,
            "vllm:request_success_total",
            &[("finished_reason", reason)],
        )
    };
    let before = m.encode();
    for r in FinishedReason::ALL {
        assert_eq!(success(&before, r.as_str()), 0.0, "{r:?} exists at startup");
    }
    for r in [
        FinishedReason::Stop,
        FinishedReason::Stop,
        FinishedReason::Abort,
    ] {
        m.request_finished(&finished(r));
    }
    let text = m.encode();
    let counts = ["stop", "length", "abort", "error"].map(|r| success(&text, r));
    assert_eq!(counts, [2.0, 0.0, 1.0, 0.0]);
    let v = |name: &str, with: &[(&str, &str)]| value(&text, name, with);
    assert_eq!(v("vllm:e2e_request_latency_seconds_count", &[]), 3.0);
    assert_eq!(v("vllm:e2e_request_latency_seconds_sum", &[]), 3.75);
    assert_eq!(
        v("vllm:e2e_request_latency_seconds_bucket", &[("le", "1.0")]),
        0.0
    );
    assert_eq!(
        v("vllm:e2e_request_latency_seconds_bucket", &[("le", "1.5")]),
        3.0
    );
    assert_eq!(v("vllm:request_prompt_tokens_sum", &[]), 300.0);
    assert_eq!(v("vllm:request_prefill_kv_computed_tokens_sum", &[]), 108.0);
    assert_eq!(v("vllm:request_params_n_count", &[]), 3.0);
    // max_tokens 0 (unset) and a missing mean TPOT are not observed.
    assert_eq!(v("vllm:request_params_max_tokens_count", &[]), 0.0);
    assert_eq!(
        v("vllm:request_time_per_output_token_seconds_count", &[]),
        0.0
    );
    let tpot = Some(0.05);
    m.request_finished(&FinishedRequest {
        max_tokens_param: 64,
        mean_tpot_s: tpot,
        ..finished(FinishedReason::Length)
    });
    let text = m.encode();
    assert_eq!(
        value(&text, "vllm:request_params_max_tokens_sum", &[]),
        64.0
    );
    assert_eq!(
        value(&text, "vllm:request_time_per_output_token_seconds_sum", &[]),
        0.05
    );
}

#[test]
fn step_and_nixl_metrics() {
    let m = metrics();
    m.prefix_cache(64, 48);
    m.preempted(2);
    m.prompt_tokens(100);
    m.generation_tokens(5);
    m.iteration_tokens(105);
    m.ttft(0.03);
    m.itl(0.02);
    m.itl(0.04);
    m.ttft(f64::NAN); // dropped rather than poisoning `_sum`
    m.nixl_transfer(0.012, 0.0004, 3 << 20, 96);
    m.nixl_failed_transfer();
    m.nixl_failed_notification();
    m.nixl_failed_notification();
    m.nixl_expired(3);
    let text = m.encode();
    #[rustfmt::skip]
    let expected = [
        ("vllm:prefix_cache_queries_total", 64.0), ("vllm:prefix_cache_hits_total", 48.0),
        ("vllm:num_preemptions_total", 2.0), ("vllm:prompt_tokens_total", 100.0),
        ("vllm:generation_tokens_total", 5.0), ("vllm:iteration_tokens_total_sum", 105.0),
        ("vllm:time_to_first_token_seconds_count", 1.0),
        ("vllm:inter_token_latency_seconds_count", 2.0),
        ("vllm:time_per_output_token_seconds_count", 2.0),
        ("vllm:nixl_xfer_time_seconds_count", 1.0), ("vllm:nixl_post_time_seconds_sum", 0.0004),
        ("vllm:nixl_bytes_transferred_sum", 3145728.0), ("vllm:nixl_num_descriptors_sum", 96.0),
        ("vllm:nixl_num_failed_transfers_total", 1.0),
        ("vllm:nixl_num_failed_notifications_total", 2.0),
        ("vllm:nixl_num_kv_expired_reqs_total", 3.0),
    ];
    for (name, want) in expected {
        assert_eq!(value(&text, name, &[]), want, "{name}");
    }
    let le = [("le", "0.025")];
    assert_eq!(
        value(&text, "vllm:inter_token_latency_seconds_bucket", &le),
        1.0
    );
    assert!(text.contains(
        "vllm:nixl_bytes_transferred_sum{engine=\"0\",model_name=\"test-model\"} 3.145728e+06\n"
    ));
}

#[test]
fn openmetrics_and_negotiation() {
    let m = metrics();
    let om = m.encode_openmetrics();
    assert!(om.ends_with("# EOF\n"));
    assert!(
        om.contains("# TYPE vllm:prompt_tokens counter\n")
            && om.contains("\nvllm:prompt_tokens_total{")
    );
    let accept = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5";
    assert_eq!(
        m.encode_for_accept(Some(accept)),
        (om, OPENMETRICS_CONTENT_TYPE)
    );
    assert_eq!(m.encode_for_accept(Some("*/*")), (m.encode(), CONTENT_TYPE));
    assert_eq!(m.encode_for_accept(None).1, CONTENT_TYPE);
}

#[test]
fn deterministic_escaped_and_shareable() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<EngineMetrics>();
    let name = "org/m \"q\"\\x";
    let cache = CacheConfigInfo {
        gpu_memory_utilization: 0.95,
        ..cache()
    };
    let text = EngineMetrics::new(name, "1", 4096, &cache).encode();
    assert_eq!(text, EngineMetrics::new(name, "1", 4096, &cache).encode());
    for (n, labels, _) in samples(&text) {
        assert_eq!(label(&labels, "engine"), Some("1"), "{n}");
        let model = label(&labels, "model_name");
        assert!(model.is_none() || model == Some(r#"org/m \"q\"\\x"#), "{n}");
    }
    assert!(text.contains("gpu_memory_utilization=\"0.95\""));
}

#[test]
fn python_float_formatting() {
    #[rustfmt::skip]
    let repr = [
        (0.0, "0.0"), (0.9, "0.9"), (1.0, "1.0"), (0.0001, "0.0001"), (0.00001, "1e-05"),
        (1.5e-7, "1.5e-07"), (123456.0, "123456.0"), (1e15, "1000000000000000.0"),
        (1e16, "1e+16"), (-2.5, "-2.5"),
    ];
    for (v, s) in repr {
        assert_eq!(py_float_repr(v), s, "repr({v})");
    }
    #[rustfmt::skip]
    let go = [
        (f64::INFINITY, "+Inf"), (100000.0, "100000.0"), (1000000.0, "1e+06"),
        (2097152.0, "2.097152e+06"), (34359738368.0, "3.4359738368e+010"), (1e16, "1e+16"),
        (0.005, "0.005"), (-1234567.0, "-1234567.0"),
    ];
    for (v, s) in go {
        assert_eq!(go_float(v), s, "floatToGoString({v})");
    }
}
