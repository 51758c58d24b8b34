//! `tandem sim --grpc-port`: vLLM's native gRPC (crate `vllm-proto` 0.6.0) on the same engine as
//! the HTTP surface, driven by the crate's own tonic clients (vllm-grpc.md §9).

use std::time::Duration;

use serde_json::{json, Value};
use tonic::transport::Channel;
use tonic::Code;
use vllm_proto::control_client::ControlClient;
use vllm_proto::finish_info::{FinishReason, StopReason};
use vllm_proto::generate_request::Prompt;
use vllm_proto::inference_client::InferenceClient;
use vllm_proto::{
    AbortRequest, FinishInfo, GenerateRequest, GenerateResponse, GetKvEventSourcesRequest,
    GetModelInfoRequest, GetServerInfoRequest, KvCacheParameters, RandomSampling, ResponseOptions,
    ShutdownRequest, StoppingCriteria, TokenIds,
};

use crate::support::{Sim, PROMPT};

/// One channel per engine, shared by both services (as a coordinator holds it).
struct Grpc {
    inf: InferenceClient<Channel>,
    ctl: ControlClient<Channel>,
}

async fn grpc(sim: &Sim) -> Grpc {
    let addr = sim.ready["grpc"]
        .as_str()
        .expect("the ready line names the gRPC address");
    let ch = Channel::from_shared(format!("http://{addr}"))
        .expect("valid URI")
        .connect()
        .await
        .expect("connect to the sim's gRPC port");
    Grpc {
        inf: InferenceClient::new(ch.clone()),
        ctl: ControlClient::new(ch),
    }
}

fn ids(v: &[u32]) -> Option<Prompt> {
    Some(Prompt::TokenIds(TokenIds { ids: v.to_vec() }))
}

/// A request for `max` tokens of `prompt`, without EOS, with output token ids.
fn gen(id: &str, prompt: &[u32], max: u32) -> GenerateRequest {
    GenerateRequest {
        request_id: id.into(),
        prompt: ids(prompt),
        stopping: Some(StoppingCriteria {
            max_new_tokens: max,
            ignore_eos: true,
            ..Default::default()
        }),
        response: Some(ResponseOptions {
            output_token_ids: true,
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn finish(r: &GenerateResponse) -> Option<&FinishInfo> {
    r.outputs.as_ref()?.finish_info.as_ref()
}

/// Read a stream to its end: the messages, and the status it ended with (None = OK).
async fn drain(
    mut s: tonic::Streaming<GenerateResponse>,
) -> (Vec<GenerateResponse>, Option<tonic::Status>) {
    let mut out = Vec::new();
    loop {
        match s.message().await {
            Ok(Some(m)) => out.push(m),
            Ok(None) => return (out, None),
            Err(e) => return (out, Some(e)),
        }
    }
}

fn streamed_tokens(msgs: &[GenerateResponse]) -> Vec<u32> {
    msgs.iter()
        .filter_map(|m| m.outputs.as_ref())
        .flat_map(|o| o.token_ids.clone())
        .collect()
}

async fn detokenize(sim: &Sim, tokens: &[u32]) -> String {
    let (status, v) = sim
        .post_json("/detokenize", &json!({ "tokens": tokens }), None)
        .await;
    assert_eq!(status, 200);
    v["prompt"].as_str().expect("text").to_string()
}

fn side_port(sim: &Sim) -> f64 {
    sim.ready["side_channel"]
        .as_str()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .parse::<f64>()
        .unwrap()
}

#[tokio::test]
async fn discovery_reports_the_engine_and_health_is_serving() {
    let sim = Sim::start(&[
        "--grpc-port",
        "0",
        "--max-num-seqs",
        "64",
        "--kv-events-endpoint",
        "tcp://127.0.0.1:0",
        "--kv-events-replay-endpoint",
        "tcp://127.0.0.1:0",
    ])
    .await;
    let mut g = grpc(&sim).await;
    let info = g
        .ctl
        .get_server_info(GetServerInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.proto_version, vllm_proto::VERSION);
    assert_eq!(info.proto_version, "0.6.0");
    assert_eq!(info.api_version, "vllm");
    assert!(!info.engine_version.is_empty());
    assert!(
        info.instance_id.parse::<u128>().is_ok(),
        "{}",
        info.instance_id
    );
    assert_eq!(info.kv_block_size, 16);
    assert_eq!(
        info.total_kv_blocks,
        sim.ready["num_gpu_blocks"].as_u64().unwrap()
    );
    let models: Value = sim.get("/v1/models").await.json().await.unwrap();
    assert_eq!(
        u64::from(info.max_model_len),
        models["data"][0]["max_model_len"].as_u64().unwrap()
    );
    assert_eq!(info.max_running_requests, 64);
    assert_eq!(info.max_batched_tokens, 8192);
    let par = info.parallelism.unwrap();
    assert_eq!(
        (
            par.tensor_parallel_size,
            par.data_parallel_size,
            par.world_size
        ),
        (1, 1, 1)
    );
    assert_eq!(info.effective_attention_block_size, Some(16));

    let m = g
        .ctl
        .get_model_info(GetModelInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(m.served_model_name, sim.ready["model"].as_str().unwrap());
    assert_eq!(m.model_id, "Qwen/Qwen3-0.6B");
    assert!(m.supports_text_input && m.supports_token_ids_input);
    assert!(!m.supports_lora && !m.supports_multimodal);

    let src = g
        .ctl
        .get_kv_event_sources(GetKvEventSourcesRequest {})
        .await
        .unwrap()
        .into_inner()
        .sources;
    assert_eq!(src.len(), 1);
    assert_eq!(src[0].transport, "zmq");
    assert_eq!(src[0].endpoint, sim.ready["kv_events"].as_str().unwrap());
    assert_eq!(
        src[0].replay_endpoint,
        sim.ready["kv_events_replay"].as_str().unwrap()
    );
    assert_eq!(
        (src[0].encoding.as_str(), src[0].schema_version),
        ("msgpack", 1)
    );
    assert_eq!(src[0].data_parallel_rank, Some(0));

    // Every other Control RPC is there and says so.
    let e = g.ctl.shutdown(ShutdownRequest {}).await.unwrap_err();
    assert_eq!(e.code(), Code::Unimplemented);

    let ch = Channel::from_shared(format!("http://{}", sim.ready["grpc"].as_str().unwrap()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(ch);
    for service in ["", "vllm.Inference", "vllm.Control"] {
        let r = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            r.status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
            "{service}"
        );
    }
}

#[tokio::test]
async fn no_grpc_port_no_grpc_server() {
    let sim = Sim::start(&[]).await;
    assert!(sim.ready["grpc"].is_null(), "{}", sim.ready);
}

#[tokio::test]
async fn generate_and_stream_equal_the_http_completion() {
    let sim = Sim::start(&["--grpc-port", "0", "--seed", "5"]).await;
    let prompt = sim.tokens(PROMPT).await;
    let (status, http) = sim
        .complete(
            &json!({"prompt": prompt, "max_tokens": 12, "ignore_eos": true, "temperature": 0}),
        )
        .await;
    assert_eq!(status, 200, "{http}");
    let want_text = http["choices"][0]["text"].as_str().unwrap().to_string();
    let mut g = grpc(&sim).await;

    let unary = g
        .inf
        .generate(gen("u-1", &prompt, 12))
        .await
        .unwrap()
        .into_inner();
    let p = unary.prompt_info.as_ref().unwrap();
    assert_eq!(p.num_prompt_tokens as usize, prompt.len());
    assert!(p.token_ids.is_empty(), "prompt ids only on request");
    let o = unary.outputs.as_ref().unwrap();
    assert_eq!((o.num_tokens, o.token_ids.len()), (12, 12));
    assert_eq!(o.text, want_text);
    assert_eq!(detokenize(&sim, &o.token_ids).await, want_text);
    let f = finish(&unary).unwrap();
    assert_eq!(f.finish_reason, FinishReason::Length as i32);
    assert_eq!(f.num_output_tokens, 12);
    assert!(f.kv_transfer_params.is_none());
    // The same prompt again hits the prefix cache (whole blocks).
    let again = g
        .inf
        .generate(gen("u-2", &prompt, 12))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        finish(&again).unwrap().num_cached_tokens,
        Some(((prompt.len() - 1) / 16 * 16) as u32)
    );

    // Streamed: PromptInfo alone first, then one chunk per token, the last with the finish.
    let (msgs, end) = drain(
        g.inf
            .generate_stream(gen("s-1", &prompt, 12))
            .await
            .unwrap()
            .into_inner(),
    )
    .await;
    assert!(end.is_none(), "{end:?}");
    assert_eq!(msgs.len(), 13);
    assert!(msgs[0].prompt_info.is_some() && msgs[0].outputs.is_none());
    assert!(msgs[1..].iter().all(|m| m.prompt_info.is_none()
        && m.outputs
            .as_ref()
            .is_some_and(|o| o.num_tokens == 1 && o.index == 0)));
    assert!(msgs[1..12].iter().all(|m| finish(m).is_none()));
    let f = finish(&msgs[12]).unwrap();
    assert_eq!(
        (f.finish_reason, f.num_output_tokens),
        (FinishReason::Length as i32, 12)
    );
    assert_eq!(streamed_tokens(&msgs), o.token_ids);
    let text: String = msgs
        .iter()
        .filter_map(|m| m.outputs.as_ref())
        .map(|o| o.text.as_str())
        .collect();
    assert_eq!(text, want_text);

    // A text prompt is tokenised as the HTTP surface does; a request seed is honoured alike.
    let (_, http_seeded) = sim
        .complete(&json!({"prompt": PROMPT, "max_tokens": 8, "ignore_eos": true, "seed": 11}))
        .await;
    let seeded = g
        .inf
        .generate(GenerateRequest {
            prompt: Some(Prompt::Text(PROMPT.into())),
            sampling: Some(RandomSampling {
                seed: Some(11),
                ..Default::default()
            }),
            ..gen("t-1", &[], 8)
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        seeded.outputs.unwrap().text,
        http_seeded["choices"][0]["text"].as_str().unwrap()
    );

    // Unset temperature is greedy and max_new_tokens = 0 runs to the context limit: a prompt
    // one short of `--max-model-len` gets exactly one token.
    let short = Sim::start(&["--grpc-port", "0", "--max-model-len", "64"]).await;
    let mut gs = grpc(&short).await;
    let r = gs
        .inf
        .generate(gen("ctx", &[65; 63], 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(finish(&r).unwrap().num_output_tokens, 1);
    assert_eq!(
        finish(&r).unwrap().finish_reason,
        FinishReason::Length as i32
    );
}

#[tokio::test]
async fn stop_token_finish_names_it() {
    let sim = Sim::start(&["--grpc-port", "0", "--seed", "2"]).await;
    let mut g = grpc(&sim).await;
    let prompt = sim.tokens(PROMPT).await;
    let first = g
        .inf
        .generate(gen("a", &prompt, 4))
        .await
        .unwrap()
        .into_inner()
        .outputs
        .unwrap()
        .token_ids;
    // Stop on the third token: it stays in token_ids, the finish names it.
    let mut req = gen("b", &prompt, 4);
    req.stopping.as_mut().unwrap().stop_token_ids = vec![first[2]];
    let r = g.inf.generate(req).await.unwrap().into_inner();
    let f = finish(&r).unwrap();
    assert_eq!(f.finish_reason, FinishReason::Stop as i32);
    let stop_at = first.iter().position(|&t| t == first[2]).unwrap();
    assert_eq!(f.stop_reason, Some(StopReason::StopTokenId(first[2])));
    assert_eq!(r.outputs.unwrap().token_ids, first[..=stop_at].to_vec());
}

#[tokio::test]
async fn validations_answer_with_vllms_status_codes() {
    let sim = Sim::start(&["--grpc-port", "0", "--max-model-len", "64"]).await;
    let mut g = grpc(&sim).await;
    let code = |r: Result<tonic::Response<GenerateResponse>, tonic::Status>| {
        let e = r.expect_err("rejected");
        (e.code(), e.message().to_string())
    };
    let mut min_over_max = gen("v", &[65, 66], 4);
    min_over_max.stopping.as_mut().unwrap().min_new_tokens = 5;
    let (c, m) = code(g.inf.generate(min_over_max.clone()).await);
    assert_eq!(c, Code::InvalidArgument);
    assert!(m.contains("min_tokens=5, max_tokens=4"), "{m}");
    // The stream RPC rejects before any message, with the same status.
    let e = g.inf.generate_stream(min_over_max).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    let (c, m) = code(
        g.inf
            .generate(GenerateRequest {
                model: "nope".into(),
                ..gen("v", &[65], 4)
            })
            .await,
    );
    assert_eq!((c, m.as_str()), (Code::NotFound, "model `nope` not found"));
    assert!(g
        .inf
        .generate(GenerateRequest {
            model: sim.ready["model"].as_str().unwrap().into(),
            ..gen("v", &[65], 2)
        })
        .await
        .is_ok());

    let (c, m) = code(g.inf.generate(gen("v", &[65; 64], 4)).await);
    assert_eq!(c, Code::InvalidArgument);
    assert!(m.contains("maximum context length is 64"), "{m}");

    let (c, m) = code(
        g.inf
            .generate(GenerateRequest {
                sampling: Some(RandomSampling {
                    num_sequences: 2,
                    ..Default::default()
                }),
                ..gen("v", &[65], 4)
            })
            .await,
    );
    assert_eq!(
        (c, m.as_str()),
        (Code::InvalidArgument, "num_sequences > 1 is not supported")
    );
    let (c, _) = code(
        g.inf
            .generate(GenerateRequest {
                prompt: None,
                ..gen("v", &[], 4)
            })
            .await,
    );
    assert_eq!(c, Code::InvalidArgument);

    let mut bad_rank = tonic::Request::new(gen("v", &[65], 2));
    bad_rank
        .metadata_mut()
        .insert("x-data-parallel-rank", "two".parse().unwrap());
    assert_eq!(
        g.inf.generate(bad_rank).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    // Nothing reached the engine.
    assert_eq!(sim.metric("vllm:request_success_total", &[]).await, 1.0);
}

fn do_remote_decode() -> Option<KvCacheParameters> {
    let s = prost_types::Struct {
        fields: [("do_remote_decode", true), ("do_remote_prefill", false)]
            .into_iter()
            .map(|(k, b)| {
                (
                    k.to_string(),
                    prost_types::Value {
                        kind: Some(prost_types::value::Kind::BoolValue(b)),
                    },
                )
            })
            .collect(),
    };
    Some(KvCacheParameters {
        kv_transfer_params: Some(s),
        ..Default::default()
    })
}

fn field<'a>(s: &'a prost_types::Struct, k: &str) -> &'a prost_types::value::Kind {
    s.fields[k].kind.as_ref().unwrap()
}

#[tokio::test]
async fn pd_round_trip_over_grpc_equals_colocated() {
    use prost::Message as _;
    use prost_types::value::Kind;
    let (p, d, c) = tokio::join!(
        Sim::start(&["--grpc-port", "0", "--seed", "3", "--hash-seed", "p"]),
        Sim::start(&["--grpc-port", "0", "--seed", "3", "--hash-seed", "d"]),
        Sim::start(&["--grpc-port", "0", "--seed", "3", "--hash-seed", "c"]),
    );
    let prompt = p.tokens(PROMPT).await;
    let (mut gp, mut gd, mut gc) = (grpc(&p).await, grpc(&d).await, grpc(&c).await);
    let want = gc
        .inf
        .generate(gen("colo", &prompt, 24))
        .await
        .unwrap()
        .into_inner()
        .outputs
        .unwrap()
        .token_ids;
    assert_eq!(want.len(), 24);

    // Leg 1: prefill, one token, `do_remote_decode`.
    let mut leg1 = gen("req-1", &prompt, 1);
    leg1.kv = do_remote_decode();
    let pr = gp.inf.generate(leg1).await.unwrap().into_inner();
    let f = finish(&pr).unwrap().clone();
    assert_eq!(f.finish_reason, FinishReason::Length as i32);
    let kv = f
        .kv_transfer_params
        .expect("prefill returns kv_transfer_params");
    assert_eq!(field(&kv, "do_remote_prefill"), &Kind::BoolValue(true));
    assert_eq!(field(&kv, "do_remote_decode"), &Kind::BoolValue(false));
    assert_eq!(
        field(&kv, "remote_engine_id"),
        &Kind::StringValue(p.ready["engine_id"].as_str().unwrap().into())
    );
    assert_eq!(
        field(&kv, "remote_host"),
        &Kind::StringValue("127.0.0.1".into())
    );
    // Numbers are doubles on the wire: the decode side must take the port as one.
    assert_eq!(field(&kv, "remote_port"), &Kind::NumberValue(side_port(&p)));
    assert_eq!(field(&kv, "tp_size"), &Kind::NumberValue(1.0));
    let Kind::StringValue(rid) = field(&kv, "remote_request_id") else {
        panic!("remote_request_id is a string")
    };
    let suffix = rid
        .strip_prefix("req-1-")
        .expect("internal id = external-suffix");
    assert!(
        suffix.len() == 8 && suffix.chars().all(|c| c.is_ascii_hexdigit()),
        "{rid}"
    );
    let Kind::ListValue(blocks) = field(&kv, "remote_block_ids") else {
        panic!("remote_block_ids is a list")
    };
    assert_eq!(blocks.values.len(), prompt.len().div_ceil(16));
    assert!(p.metric("vllm:kv_cache_usage_perc", &[]).await > 0.0);

    // The params as a coordinator relays them: the Struct's wire bytes, decoded again.
    let relayed = prost_types::Struct::decode(kv.encode_to_vec().as_slice()).unwrap();
    assert_eq!(relayed, kv);

    // Leg 2: decode, streamed, with P's params verbatim.
    let mut leg2 = gen("req-1", &prompt, 24);
    leg2.kv = Some(KvCacheParameters {
        kv_transfer_params: Some(relayed),
        ..Default::default()
    });
    let (msgs, end) = drain(gd.inf.generate_stream(leg2).await.unwrap().into_inner()).await;
    assert!(end.is_none(), "{end:?}");
    assert!(msgs[0].prompt_info.is_some());
    assert_eq!(streamed_tokens(&msgs), want, "disaggregated = colocated");
    let last = finish(msgs.last().unwrap()).unwrap();
    assert_eq!(
        (last.finish_reason, last.num_output_tokens),
        (FinishReason::Length as i32, 24)
    );
    assert!(last.kv_transfer_params.is_none());

    // D pulled the blocks once and computed only the last prompt token (vLLM recomputes it);
    // the colocated engine computed the whole prompt.
    assert_eq!(
        d.metric("vllm:nixl_xfer_time_seconds_count", &[]).await,
        1.0
    );
    assert_eq!(
        d.metric("vllm:request_prefill_kv_computed_tokens_sum", &[])
            .await,
        1.0
    );
    assert_eq!(
        c.metric("vllm:request_prefill_kv_computed_tokens_sum", &[])
            .await,
        prompt.len() as f64
    );
    // The read notification freed P's blocks; nothing expired.
    let usage = p
        .wait_metric("vllm:kv_cache_usage_perc", &[], |v| v == 0.0)
        .await;
    assert_eq!(usage, 0.0);
    assert_eq!(
        p.metric("vllm:nixl_num_kv_expired_reqs_total", &[]).await,
        0.0
    );
}

/// A sim in real time, so a long request is still running when the test acts on it.
async fn slow_sim() -> Sim {
    Sim::spawn(&["--model", "qwen3-0.6b", "--grpc-port", "0"]).await
}

#[tokio::test]
async fn abort_ends_the_stream_aborted_and_frees_the_kv() {
    let sim = slow_sim().await;
    let mut g = grpc(&sim).await;
    let prompt = sim.tokens(PROMPT).await;
    let mut s = g
        .inf
        .generate_stream(gen("ab-1", &prompt, 20_000))
        .await
        .unwrap()
        .into_inner();
    let first = s.message().await.unwrap().unwrap();
    assert!(first.prompt_info.is_some());
    assert!(s.message().await.unwrap().unwrap().outputs.is_some());
    assert!(sim.metric("vllm:kv_cache_usage_perc", &[]).await > 0.0);
    // Unknown ids and an empty list are no-ops.
    for ids in [vec![], vec!["nobody".to_string()]] {
        g.ctl
            .abort(AbortRequest { request_ids: ids })
            .await
            .unwrap();
    }
    g.ctl
        .abort(AbortRequest {
            request_ids: vec!["ab-1".into()],
        })
        .await
        .unwrap();
    let (rest, end) = drain(s).await;
    assert!(end.is_none(), "an aborted stream ends OK: {end:?}");
    let f = finish(rest.last().unwrap()).expect("a terminal ABORTED output");
    assert_eq!(f.finish_reason, FinishReason::Aborted as i32);
    assert_eq!(rest.last().unwrap().outputs.as_ref().unwrap().num_tokens, 0);
    let usage = sim
        .wait_metric("vllm:kv_cache_usage_perc", &[], |v| v == 0.0)
        .await;
    assert_eq!(usage, 0.0);
    assert_eq!(sim.metric("vllm:num_requests_running", &[]).await, 0.0);
    assert_eq!(
        sim.metric(
            "vllm:request_success_total",
            &[("finished_reason", "abort")]
        )
        .await,
        1.0
    );

    // A unary call answers with what it had and the ABORTED finish.
    let mut inf = g.inf.clone();
    let req = gen("ab-2", &prompt, 20_000);
    let call = tokio::spawn(async move { inf.generate(req).await });
    let running = sim
        .wait_metric("vllm:num_requests_running", &[], |v| v > 0.0)
        .await;
    assert_eq!(running, 1.0);
    g.ctl
        .abort(AbortRequest {
            request_ids: vec!["ab-2".into()],
        })
        .await
        .unwrap();
    let r = call.await.unwrap().unwrap().into_inner();
    assert_eq!(
        finish(&r).unwrap().finish_reason,
        FinishReason::Aborted as i32
    );
    let usage = sim
        .wait_metric("vllm:kv_cache_usage_perc", &[], |v| v == 0.0)
        .await;
    assert_eq!(usage, 0.0);
}

#[tokio::test]
async fn a_dropped_stream_aborts_the_request() {
    let sim = slow_sim().await;
    let mut g = grpc(&sim).await;
    let prompt = sim.tokens(PROMPT).await;
    let mut s = g
        .inf
        .generate_stream(gen("drop-1", &prompt, 20_000))
        .await
        .unwrap()
        .into_inner();
    s.message().await.unwrap().unwrap();
    s.message().await.unwrap().unwrap();
    drop(s);
    let aborted = sim
        .wait_metric(
            "vllm:request_success_total",
            &[("finished_reason", "abort")],
            |v| v > 0.0,
        )
        .await;
    assert_eq!(aborted, 1.0);
    assert_eq!(sim.metric("vllm:num_requests_running", &[]).await, 0.0);
    assert_eq!(sim.metric("vllm:kv_cache_usage_perc", &[]).await, 0.0);
}

#[tokio::test]
async fn faults_reach_the_grpc_path() {
    let sim = Sim::start(&["--grpc-port", "0"]).await;
    let mut g = grpc(&sim).await;
    let prompt = sim.tokens(PROMPT).await;

    sim.faults(json!({"fail_next": 1})).await;
    let e = g.inf.generate(gen("f", &prompt, 4)).await.unwrap_err();
    assert_eq!(e.code(), Code::Internal);

    // EOS first on a prefill: no params (the coordinator's fallback path).
    sim.faults(json!({"eos_next": 1})).await;
    let mut leg1 = gen("e", &prompt, 1);
    leg1.kv = do_remote_decode();
    leg1.stopping.as_mut().unwrap().ignore_eos = false;
    let r = g.inf.generate(leg1).await.unwrap().into_inner();
    let f = finish(&r).unwrap();
    assert_eq!(f.finish_reason, FinishReason::Stop as i32);
    assert!(matches!(f.stop_reason, Some(StopReason::EosTokenId(_))));
    assert!(f.kv_transfer_params.is_none());

    // Stall: accepted and never answered.
    sim.faults(json!({"stall_next": 1})).await;
    let mut req = tonic::Request::new(gen("s", &prompt, 4));
    req.set_timeout(Duration::from_millis(300));
    assert!(g.inf.generate(req).await.is_err());

    // Death mid-stream: some tokens, then the connection goes, not a clean status.
    sim.faults(json!({"die_after_tokens": 3})).await;
    let (msgs, end) = drain(
        g.inf
            .generate_stream(gen("d", &prompt, 10))
            .await
            .unwrap()
            .into_inner(),
    )
    .await;
    let e = end.expect("the stream fails");
    assert_eq!(streamed_tokens(&msgs).len(), 3, "{msgs:?}");
    assert!(msgs.iter().all(|m| finish(m).is_none()));
    // tonic's view of a connection lost mid-body ("h2 protocol error: error reading a body
    // from connection"), what a client sees of a dead engine.
    assert_eq!(e.code(), Code::Unknown, "{e:?}");
    sim.faults(json!({"die_after_tokens": 0})).await;
    // The engine itself lives on (a fresh connection works).
    let mut g2 = grpc(&sim).await;
    assert!(g2.inf.generate(gen("ok", &prompt, 2)).await.is_ok());
    let usage = sim
        .wait_metric("vllm:kv_cache_usage_perc", &[], |v| v == 0.0)
        .await;
    assert_eq!(usage, 0.0);
}

#[tokio::test]
async fn a_rejected_decode_leg_still_frees_the_prefill_blocks() {
    let (p, d) = tokio::join!(
        Sim::start(&["--grpc-port", "0"]),
        Sim::start(&["--grpc-port", "0"]),
    );
    let prompt = p.tokens(PROMPT).await;
    let (mut gp, mut gd) = (grpc(&p).await, grpc(&d).await);
    let mut leg1 = gen("rej", &prompt, 1);
    leg1.kv = do_remote_decode();
    let pr = gp.inf.generate(leg1).await.unwrap().into_inner();
    let kv = finish(&pr).unwrap().kv_transfer_params.clone().unwrap();
    assert!(p.metric("vllm:kv_cache_usage_perc", &[]).await > 0.0);
    // A decode leg that fails validation never pulls; it tells P to free the blocks, as the
    // HTTP surface does (the coordinator's reject-release leg relies on it).
    let mut leg2 = gen("rej", &prompt, 4);
    leg2.stopping.as_mut().unwrap().min_new_tokens = 5;
    leg2.kv = Some(KvCacheParameters {
        kv_transfer_params: Some(kv),
        ..Default::default()
    });
    let e = gd.inf.generate(leg2).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let usage = p
        .wait_metric("vllm:kv_cache_usage_perc", &[], |v| v == 0.0)
        .await;
    assert_eq!(usage, 0.0);
    assert_eq!(
        p.metric("vllm:nixl_num_kv_expired_reqs_total", &[]).await,
        0.0
    );
    assert_eq!(
        d.metric("vllm:nixl_xfer_time_seconds_count", &[]).await,
        0.0
    );
}
