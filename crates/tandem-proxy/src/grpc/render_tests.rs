use serde_json::{json, Value};
use vllm_proto::finish_info::{FinishReason as Pb, StopReason};
use vllm_proto::{FinishInfo, GenerateResponse, PromptInfo, SequenceOutput};

use super::*;
use crate::grpc::request::json_to_struct;

const CREATED: u64 = 1_700_000_000;

fn spec(kind: Kind, stream: bool) -> RenderSpec {
    RenderSpec {
        kind,
        stream,
        include_usage: false,
        continuous_usage_stats: false,
        response_id: match kind {
            Kind::Completions => "cmpl-r1".into(),
            Kind::Chat => "chatcmpl-r1".into(),
        },
        created: CREATED,
        model: "m".into(),
        prompt_tokens: 5,
        cached_tokens: None,
        prompt_tokens_details: false,
    }
}

fn prompt(n: u32) -> GenerateResponse {
    GenerateResponse {
        prompt_info: Some(PromptInfo {
            num_prompt_tokens: n,
            ..Default::default()
        }),
        outputs: None,
    }
}

fn out(text: &str, tokens: u32, finish: Option<FinishInfo>) -> GenerateResponse {
    GenerateResponse {
        prompt_info: None,
        outputs: Some(SequenceOutput {
            text: text.into(),
            num_tokens: tokens,
            token_ids: (0..tokens).collect(),
            finish_info: finish,
            ..Default::default()
        }),
    }
}

fn fin(reason: Pb, stop: Option<StopReason>, tokens: u32) -> FinishInfo {
    FinishInfo {
        num_output_tokens: tokens,
        finish_reason: reason as i32,
        stop_reason: stop,
        num_cached_tokens: Some(0),
        ..Default::default()
    }
}

/// What a vLLM server streams for a 3-token answer " Hello", " world", "!" cut by
/// `max_tokens: 3`: `PromptInfo` alone, then one output per token, the last with the finish.
fn three_tokens() -> Vec<GenerateResponse> {
    vec![
        prompt(5),
        out(" Hello", 1, None),
        out(" world", 1, None),
        out("!", 1, Some(fin(Pb::Length, None, 3))),
    ]
}

/// The unary `Generate` answer for the same request: one message, outputs aggregated.
fn three_tokens_unary() -> Vec<GenerateResponse> {
    let mut m = out(" Hello world!", 3, Some(fin(Pb::Length, None, 3)));
    m.prompt_info = prompt(5).prompt_info;
    vec![m]
}

fn stream_all(r: &mut Renderer, msgs: &[GenerateResponse]) -> Vec<Chunk> {
    let mut all = Vec::new();
    for m in msgs {
        all.extend(r.push(m).unwrap());
    }
    all.extend(r.finish().unwrap());
    all
}

fn text(c: &Chunk) -> &str {
    std::str::from_utf8(&c.bytes).unwrap()
}

/// The event's JSON payload.
fn payload(c: &Chunk) -> Value {
    let s = text(c);
    let body = s
        .strip_prefix("data: ")
        .and_then(|s| s.strip_suffix("\n\n"))
        .unwrap();
    serde_json::from_str(body).unwrap()
}

/// Golden comparison: the same JSON, and byte-for-byte the same serialisation (key order).
fn assert_events(got: &[Chunk], want: &[&str]) {
    let got_s: Vec<&str> = got.iter().map(text).collect();
    assert_eq!(got.len(), want.len(), "{got_s:#?}");
    for (g, w) in got.iter().zip(want) {
        let w = w.strip_prefix("data: ").unwrap();
        if w == "[DONE]" {
            assert_eq!(text(g), "data: [DONE]\n\n");
            continue;
        }
        let wv: Value = serde_json::from_str(w).unwrap();
        assert_eq!(payload(g), wv);
        assert_eq!(text(g), format!("data: {w}\n\n"), "key order");
    }
}

fn assert_body(got: &Bytes, want: &str) {
    let gv: Value = serde_json::from_slice(got).unwrap();
    let wv: Value = serde_json::from_str(want).unwrap();
    assert_eq!(gv, wv);
    assert_eq!(std::str::from_utf8(got).unwrap(), want, "key order");
}

// The expected bytes below are written out by hand from tandem-sim's http/generate.rs
// (`stream_response`, `full_response`, `usage`) and http/fields.rs (`full_choice`,
// `stream_choice`) for the same answer: request id r1, 5 prompt tokens, no logprobs.

#[test]
fn golden_chat_stream() {
    let mut s = spec(Kind::Chat, true);
    s.include_usage = true;
    let got = stream_all(&mut Renderer::new(s), &three_tokens());
    let head =
        r#""id":"chatcmpl-r1","object":"chat.completion.chunk","created":1700000000,"model":"m""#;
    assert_events(
        &got,
        &[
            &format!(
                r#"data: {{{head},"choices":[{{"index":0,"delta":{{"role":"assistant","content":""}},"logprobs":null,"finish_reason":null}}]}}"#
            ),
            &format!(
                r#"data: {{{head},"choices":[{{"index":0,"delta":{{"content":" Hello"}},"logprobs":null,"finish_reason":null}}]}}"#
            ),
            &format!(
                r#"data: {{{head},"choices":[{{"index":0,"delta":{{"content":" world"}},"logprobs":null,"finish_reason":null}}]}}"#
            ),
            &format!(
                r#"data: {{{head},"choices":[{{"index":0,"delta":{{"content":"!"}},"logprobs":null,"finish_reason":"length","stop_reason":null}}]}}"#
            ),
            &format!(
                r#"data: {{{head},"choices":[],"usage":{{"prompt_tokens":5,"total_tokens":8,"completion_tokens":3}}}}"#
            ),
            "data: [DONE]",
        ],
    );
    let content: Vec<bool> = got.iter().map(|c| c.content).collect();
    assert_eq!(content, [false, true, true, true, false, false]);
}

#[test]
fn golden_completions_stream() {
    let mut s = spec(Kind::Completions, true);
    s.include_usage = true;
    let got = stream_all(&mut Renderer::new(s), &three_tokens());
    let head = r#""id":"cmpl-r1","object":"text_completion","created":1700000000,"model":"m""#;
    assert_events(
        &got,
        &[
            &format!(
                r#"data: {{{head},"choices":[{{"index":0,"text":" Hello","logprobs":null,"finish_reason":null,"stop_reason":null}}]}}"#
            ),
            &format!(
                r#"data: {{{head},"choices":[{{"index":0,"text":" world","logprobs":null,"finish_reason":null,"stop_reason":null}}]}}"#
            ),
            &format!(
                r#"data: {{{head},"choices":[{{"index":0,"text":"!","logprobs":null,"finish_reason":"length","stop_reason":null}}]}}"#
            ),
            &format!(
                r#"data: {{{head},"choices":[],"usage":{{"prompt_tokens":5,"total_tokens":8,"completion_tokens":3}}}}"#
            ),
            "data: [DONE]",
        ],
    );
    let content: Vec<bool> = got.iter().map(|c| c.content).collect();
    assert_eq!(content, [true, true, true, false, false]);
}

#[test]
fn golden_chat_full() {
    let want = r#"{"id":"chatcmpl-r1","object":"chat.completion","created":1700000000,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":" Hello world!","refusal":null,"annotations":null,"audio":null,"function_call":null,"tool_calls":[],"reasoning_content":null},"logprobs":null,"finish_reason":"length","stop_reason":null}],"usage":{"prompt_tokens":5,"total_tokens":8,"completion_tokens":3,"prompt_tokens_details":null},"system_fingerprint":null,"kv_transfer_params":null,"prompt_logprobs":null}"#;
    for msgs in [three_tokens_unary(), three_tokens()] {
        let got = Renderer::new(spec(Kind::Chat, false)).full(&msgs).unwrap();
        assert_body(&got, want);
    }
}

#[test]
fn golden_completions_full() {
    let want = r#"{"id":"cmpl-r1","object":"text_completion","created":1700000000,"model":"m","choices":[{"index":0,"text":" Hello world!","logprobs":null,"finish_reason":"length","stop_reason":null,"prompt_logprobs":null}],"usage":{"prompt_tokens":5,"total_tokens":8,"completion_tokens":3,"prompt_tokens_details":null},"system_fingerprint":null,"kv_transfer_params":null}"#;
    for msgs in [three_tokens_unary(), three_tokens()] {
        let got = Renderer::new(spec(Kind::Completions, false))
            .full(&msgs)
            .unwrap();
        assert_body(&got, want);
    }
}

#[test]
fn empty_outputs_are_skipped_but_counted_and_the_role_goes_with_the_first_output() {
    let mut s = spec(Kind::Chat, true);
    s.continuous_usage_stats = true;
    let mut r = Renderer::new(s);
    assert!(r.push(&prompt(5)).unwrap().is_empty(), "PromptInfo alone");
    // The first output holds back a partial character: only the role chunk goes out.
    let c = r.push(&out("", 1, None)).unwrap();
    assert_eq!(c.len(), 1);
    assert_eq!(payload(&c[0])["choices"][0]["delta"]["role"], "assistant");
    assert!(
        payload(&c[0]).get("usage").is_none(),
        "the role chunk has no usage"
    );
    let c = r.push(&out("é", 1, None)).unwrap();
    assert_eq!(c.len(), 1, "the role goes once");
    let p = payload(&c[0]);
    assert_eq!(p["choices"][0]["delta"], json!({"content": "é"}));
    // Continuous usage counts the skipped output's token too.
    assert_eq!(
        p["usage"],
        json!({"prompt_tokens": 5, "total_tokens": 7, "completion_tokens": 2, "prompt_tokens_details": null})
    );
    assert_eq!(
        serde_json::to_string(&p["usage"]).unwrap(),
        r#"{"prompt_tokens":5,"total_tokens":7,"completion_tokens":2,"prompt_tokens_details":null}"#
    );
    assert!(c[0].content);
    // An EOS finish has no text but is sent: content false.
    let c = r
        .push(&out(
            "",
            1,
            Some(fin(Pb::Stop, Some(StopReason::EosTokenId(2)), 3)),
        ))
        .unwrap();
    assert_eq!(c.len(), 1);
    assert!(!c[0].content);
    let p = payload(&c[0]);
    assert_eq!(
        p["choices"][0],
        json!({"index": 0, "delta": {"content": ""}, "logprobs": null, "finish_reason": "stop", "stop_reason": null})
    );
    assert_eq!(p["usage"]["completion_tokens"], 3);
    // No include_usage: just [DONE].
    let end = r.finish().unwrap();
    assert_eq!(end.len(), 1);
    assert_eq!(text(&end[0]), "data: [DONE]\n\n");
}

#[test]
fn completions_streams_have_no_role_chunk() {
    let mut r = Renderer::new(spec(Kind::Completions, true));
    assert!(r.push(&prompt(5)).unwrap().is_empty());
    assert!(r.push(&out("", 1, None)).unwrap().is_empty());
}

#[test]
fn stop_reasons_as_vllm_http_writes_them() {
    let cases = [
        (Some(StopReason::StopString("END".into())), json!("END")),
        (Some(StopReason::StopTokenId(7)), json!(7)),
        (Some(StopReason::EosTokenId(2)), Value::Null),
        (None, Value::Null),
    ];
    for (stop, want) in cases {
        let msgs = [out("a", 1, Some(fin(Pb::Stop, stop.clone(), 1)))];
        let body = Renderer::new(spec(Kind::Completions, false))
            .full(&msgs)
            .unwrap();
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        assert_eq!(v["choices"][0]["stop_reason"], want, "{stop:?}");
        // Streamed: on the finish chunk, chat and completions alike.
        let mut r = Renderer::new(spec(Kind::Chat, true));
        let c = r.push(&msgs[0]).unwrap();
        assert_eq!(payload(&c[1])["choices"][0]["stop_reason"], want);
    }
}

#[test]
fn cached_tokens_and_prompt_tokens_details() {
    let mut f = fin(Pb::Length, None, 3);
    f.num_cached_tokens = Some(4);
    let msgs = vec![prompt(5), out("abc", 3, Some(f))];
    let usage = |s: RenderSpec| {
        let v: Value = serde_json::from_slice(&Renderer::new(s).full(&msgs).unwrap()).unwrap();
        v["usage"]["prompt_tokens_details"].clone()
    };
    // Off (vLLM's default): null.
    assert_eq!(usage(spec(Kind::Chat, false)), Value::Null);
    // --enable-prompt-tokens-details: the engine's count.
    let mut s = spec(Kind::Chat, false);
    s.prompt_tokens_details = true;
    assert_eq!(usage(s.clone()), json!({"cached_tokens": 4}));
    // The prefill side's count wins, flag or not.
    s.cached_tokens = Some(9);
    assert_eq!(usage(s.clone()), json!({"cached_tokens": 9}));
    s.prompt_tokens_details = false;
    assert_eq!(usage(s), json!({"cached_tokens": 9}));
    // The flag with an engine that does not send the count (before 0.5): 0.
    let mut f = fin(Pb::Length, None, 1);
    f.num_cached_tokens = None;
    let mut s = spec(Kind::Completions, false);
    s.prompt_tokens_details = true;
    let v: Value =
        serde_json::from_slice(&Renderer::new(s).full(&[out("a", 1, Some(f))]).unwrap()).unwrap();
    assert_eq!(
        v["usage"]["prompt_tokens_details"],
        json!({"cached_tokens": 0})
    );
}

#[test]
fn a_cached_override_goes_into_every_streamed_usage() {
    let mut s = spec(Kind::Completions, true);
    s.include_usage = true;
    s.continuous_usage_stats = true;
    s.cached_tokens = Some(4);
    let mut r = Renderer::new(s);
    let got = stream_all(&mut r, &three_tokens());
    assert_eq!(r.cached_tokens(), Some(4));
    assert_eq!(
        payload(&got[0])["usage"],
        json!({"prompt_tokens": 5, "total_tokens": 6, "completion_tokens": 1, "prompt_tokens_details": {"cached_tokens": 4}})
    );
    let last = payload(&got[3]);
    assert_eq!(
        serde_json::to_string(&last["usage"]).unwrap(),
        r#"{"prompt_tokens":5,"total_tokens":8,"completion_tokens":3,"prompt_tokens_details":{"cached_tokens":4}}"#
    );
    // Without one the stream's last usage has no details (the engine's flag only shapes the
    // non-streaming body).
    let mut s = spec(Kind::Completions, true);
    s.include_usage = true;
    s.prompt_tokens_details = true;
    let mut r = Renderer::new(s);
    let got = stream_all(&mut r, &three_tokens());
    assert!(payload(&got[3])["usage"]
        .get("prompt_tokens_details")
        .is_none());
    assert_eq!(r.cached_tokens(), Some(0), "the engine's count");
}

#[test]
fn the_engines_prompt_count_and_final_token_count_win() {
    let mut s = spec(Kind::Completions, false);
    s.prompt_tokens = 99;
    // One chunk with two tokens (e.g. speculative decoding), then the finish.
    let msgs = [
        prompt(5),
        out("ab", 2, None),
        out("c", 1, Some(fin(Pb::Length, None, 3))),
    ];
    let v: Value = serde_json::from_slice(&Renderer::new(s).full(&msgs).unwrap()).unwrap();
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens": 5, "total_tokens": 8, "completion_tokens": 3, "prompt_tokens_details": null})
    );
    assert_eq!(v["choices"][0]["text"], "abc");
    // Without PromptInfo, Tandem's count.
    let mut s = spec(Kind::Completions, true);
    s.include_usage = true;
    s.prompt_tokens = 7;
    let mut r = Renderer::new(s);
    r.push(&msgs[1]).unwrap();
    assert_eq!(r.completion_tokens(), 2);
    r.push(&msgs[2]).unwrap();
    let end = r.finish().unwrap();
    assert_eq!(payload(&end[0])["usage"]["prompt_tokens"], 7);
    assert_eq!(payload(&end[0])["usage"]["total_tokens"], 10);
}

#[test]
fn a_prefill_answers_params_come_back_as_json_integers() {
    let mut f = fin(Pb::Length, None, 1);
    f.kv_transfer_params = json_to_struct(&json!({
        "do_remote_prefill": true, "remote_port": 5600, "remote_block_ids": [1, 2],
        "remote_host": "h",
    }));
    let body = Renderer::new(spec(Kind::Completions, false))
        .full(&[out("a", 1, Some(f))])
        .unwrap();
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        v["kv_transfer_params"],
        json!({"do_remote_prefill": true, "remote_block_ids": [1, 2], "remote_host": "h", "remote_port": 5600})
    );
    assert!(v["kv_transfer_params"]["remote_port"].is_u64());
}

#[test]
fn broken_framing_is_an_error() {
    // Aborted.
    let aborted = out("", 0, Some(fin(Pb::Aborted, None, 0)));
    let mut r = Renderer::new(spec(Kind::Chat, true));
    assert_eq!(r.push(&aborted), Err(RenderError::Aborted));
    assert_eq!(
        Renderer::new(spec(Kind::Chat, false)).full(&[prompt(5), aborted]),
        Err(RenderError::Aborted)
    );
    // A finish that says "not finished", or an unknown reason.
    for reason in [0, 9] {
        let mut f = fin(Pb::Length, None, 1);
        f.finish_reason = reason;
        let mut r = Renderer::new(spec(Kind::Completions, true));
        assert_eq!(
            r.push(&out("a", 1, Some(f))),
            Err(RenderError::FinishReason(reason))
        );
    }
    // Ended without finish_info.
    let mut r = Renderer::new(spec(Kind::Completions, true));
    r.push(&out("a", 1, None)).unwrap();
    assert_eq!(r.finish(), Err(RenderError::NoFinish));
    assert_eq!(
        Renderer::new(spec(Kind::Completions, false)).full(&[prompt(5), out("a", 1, None)]),
        Err(RenderError::NoFinish)
    );
    assert_eq!(
        Renderer::new(spec(Kind::Completions, false)).full(&[]),
        Err(RenderError::NoFinish)
    );
    // Output after the finish.
    let mut r = Renderer::new(spec(Kind::Completions, true));
    r.push(&out("a", 1, Some(fin(Pb::Length, None, 1))))
        .unwrap();
    assert_eq!(r.push(&out("b", 1, None)), Err(RenderError::AfterFinish));
    // A second sequence.
    let mut m = out("a", 1, None);
    m.outputs.as_mut().unwrap().index = 1;
    let mut r = Renderer::new(spec(Kind::Completions, true));
    assert_eq!(r.push(&m), Err(RenderError::Index(1)));
}

#[test]
fn stream_options_read_as_vllm_does() {
    let opts = |v: Value| {
        let Value::Object(m) = v else { unreachable!() };
        stream_usage(&m)
    };
    assert_eq!(opts(json!({"stream": true})), (false, false));
    assert_eq!(opts(json!({"stream_options": null})), (false, false));
    assert_eq!(opts(json!({"stream_options": {}})), (true, false));
    assert_eq!(
        opts(json!({"stream_options": {"continuous_usage_stats": true}})),
        (true, true)
    );
    assert_eq!(
        opts(json!({"stream_options": {"include_usage": false, "continuous_usage_stats": true}})),
        (false, false)
    );
    assert_eq!(
        opts(json!({"stream_options": {"include_usage": null}})),
        (false, false)
    );
}

#[test]
fn the_stream_error_event_is_vllms() {
    let c = stream_error();
    assert_eq!(
        text(&c[0]),
        "data: {\"error\":{\"message\":\"Internal server error\",\"type\":\"InternalServerError\",\"param\":null,\"code\":500}}\n\n"
    );
    assert_eq!(text(&c[1]), "data: [DONE]\n\n");
    assert!(c.iter().all(|c| !c.content));
}
