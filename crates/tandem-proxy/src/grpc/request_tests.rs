use prost_types::value::Kind as PbKind;
use serde_json::{json, Map, Value};
use vllm_proto::generate_request::Prompt;
use vllm_proto::GenerateRequest;

use super::*;

fn obj(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => panic!("not an object"),
    }
}

const IDS: &[u32] = &[11, 12, 13];

fn build(kind: Kind, body: Value, leg: Leg) -> Result<GenerateRequest, RequestError> {
    build_with(kind, body, leg, false)
}

fn build_with(
    kind: Kind,
    body: Value,
    leg: Leg,
    tool_call_parser: bool,
) -> Result<GenerateRequest, RequestError> {
    let body = obj(body);
    generate_request(
        &OpenAiRequest {
            kind,
            body: &body,
            prompt_ids: IDS,
            request_id: "req-1",
            tool_call_parser,
        },
        leg,
    )
}

fn chat(body: Value) -> GenerateRequest {
    build(Kind::Chat, body, Leg::Colocated).unwrap()
}

fn completion(body: Value) -> GenerateRequest {
    build(Kind::Completions, body, Leg::Colocated).unwrap()
}

fn num(n: f64) -> prost_types::Value {
    prost_types::Value {
        kind: Some(PbKind::NumberValue(n)),
    }
}

fn string(s: &str) -> prost_types::Value {
    prost_types::Value {
        kind: Some(PbKind::StringValue(s.into())),
    }
}

#[test]
fn a_bare_body_sets_token_ids_and_http_defaults_explicitly() {
    let r = chat(json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}));
    assert_eq!(r.request_id, "req-1");
    assert_eq!(r.model, "", "empty: the engine's served model");
    assert_eq!(
        r.prompt,
        Some(Prompt::TokenIds(vllm_proto::TokenIds { ids: IDS.to_vec() }))
    );
    // OpenAI's 1.0, not gRPC's unset (greedy).
    assert_eq!(r.temperature, Some(1.0));
    let s = r.sampling.unwrap();
    assert_eq!(s.num_sequences, 1);
    assert_eq!(
        (s.top_k, s.top_p, s.min_p, s.seed),
        (None, None, None, None)
    );
    let d = r.decoding.unwrap();
    assert_eq!(
        (
            d.presence_penalty,
            d.frequency_penalty,
            d.repetition_penalty
        ),
        (0.0, 0.0, 0.0)
    );
    assert!(d.logit_bias.is_empty() && d.structured_output.is_none());
    let st = r.stopping.unwrap();
    assert_eq!(st.max_new_tokens, 0, "chat: to the context limit");
    assert_eq!(st.min_new_tokens, 0);
    assert!(st.stop_strings.is_empty() && st.stop_token_ids.is_empty());
    assert!(!st.ignore_eos && !st.include_stop_strings);
    let o = r.response.unwrap();
    assert!(o.output_token_ids);
    assert_eq!(o.output_text, Some(true));
    assert_eq!(o.skip_special_tokens, Some(true));
    assert!(!o.prompt_logprobs && !o.output_logprobs && !o.prompt_token_ids);
    assert!(r.kv.is_none(), "colocated: no KV params");
    assert_eq!((r.truncate_prompt_tokens, r.priority), (0, 0));
}

#[test]
fn max_tokens_resolves_as_vllm_http_does() {
    let st = |r: GenerateRequest| r.stopping.unwrap().max_new_tokens;
    // Completions: the field's default is 16; an explicit null is "to the context limit".
    assert_eq!(st(completion(json!({"prompt": "x"}))), 16);
    assert_eq!(
        st(completion(json!({"prompt": "x", "max_tokens": null}))),
        0
    );
    assert_eq!(st(completion(json!({"prompt": "x", "max_tokens": 7}))), 7);
    // Completions has no max_completion_tokens.
    assert_eq!(
        st(completion(
            json!({"prompt": "x", "max_completion_tokens": 3})
        )),
        16
    );
    // Chat: max_completion_tokens, else the deprecated max_tokens, else the context limit.
    assert_eq!(st(chat(json!({"max_tokens": 9}))), 9);
    assert_eq!(
        st(chat(json!({"max_tokens": 9, "max_completion_tokens": 4}))),
        4
    );
    assert_eq!(st(chat(json!({"max_completion_tokens": null}))), 0);
    // Lax spellings, as the front door accepts them.
    assert_eq!(st(chat(json!({"max_tokens": 5.0}))), 5);
    assert_eq!(st(chat(json!({"max_tokens": "6"}))), 6);
    assert_eq!(
        build(Kind::Chat, json!({"max_tokens": -1}), Leg::Colocated),
        Err(RequestError::Invalid("max_tokens"))
    );
}

#[test]
fn every_given_sampling_field_is_carried() {
    let r = completion(json!({
        "prompt": "x", "max_tokens": 20, "temperature": 0.5, "top_k": 5, "top_p": 0.9,
        "min_p": 0.1, "seed": -42, "stop": ["a", "bc"], "stop_token_ids": [7, 8],
        "ignore_eos": true, "min_tokens": 3, "skip_special_tokens": false,
        "include_stop_str_in_output": true, "repetition_penalty": 1.1,
        "presence_penalty": -0.5, "frequency_penalty": 0.25, "allowed_token_ids": [1, 2],
        "priority": -3, "truncate_prompt_tokens": 2,
    }));
    assert_eq!(r.temperature, Some(0.5));
    let s = r.sampling.unwrap();
    assert_eq!(s.top_k, Some(5));
    assert_eq!(s.top_p, Some(0.9));
    assert_eq!(s.min_p, Some(0.1));
    assert_eq!(s.seed, Some(-42));
    let st = r.stopping.unwrap();
    assert_eq!((st.max_new_tokens, st.min_new_tokens), (20, 3));
    assert_eq!(st.stop_strings, vec!["a".to_string(), "bc".to_string()]);
    assert_eq!(st.stop_token_ids, vec![7, 8]);
    assert!(st.ignore_eos && st.include_stop_strings);
    let d = r.decoding.unwrap();
    assert_eq!(d.repetition_penalty, 1.1);
    assert_eq!(d.presence_penalty, -0.5);
    assert_eq!(d.frequency_penalty, 0.25);
    assert_eq!(d.allowed_token_ids, vec![1, 2]);
    assert_eq!(r.response.unwrap().skip_special_tokens, Some(false));
    assert_eq!((r.priority, r.truncate_prompt_tokens), (-3, 2));
}

#[test]
fn sampling_edge_values() {
    // An explicit 0 is greedy, and stays so.
    assert_eq!(chat(json!({"temperature": 0})).temperature, Some(0.0));
    assert_eq!(chat(json!({"temperature": "0.7"})).temperature, Some(0.7));
    // A null is absent: OpenAI's default.
    assert_eq!(chat(json!({"temperature": null})).temperature, Some(1.0));
    // HTTP's "disabled" (0, or the old -1) is gRPC's 0, not unset (the model's default).
    for k in [0, -1] {
        assert_eq!(chat(json!({"top_k": k})).sampling.unwrap().top_k, Some(0));
    }
    assert_eq!(chat(json!({"min_p": 0})).sampling.unwrap().min_p, Some(0.0));
    assert_eq!(
        chat(json!({"stop": "END"})).stopping.unwrap().stop_strings,
        ["END"]
    );
    assert_eq!(chat(json!({"n": 1})).sampling.unwrap().num_sequences, 1);
    assert_eq!(
        chat(json!({"best_of": 1})).sampling.unwrap().num_sequences,
        1
    );
    assert_eq!(
        chat(json!({"min_tokens": 2.0}))
            .stopping
            .unwrap()
            .min_new_tokens,
        2
    );
}

#[test]
fn n_above_one_is_refused() {
    for n in [json!(2), json!("3"), json!(2.0)] {
        let e = build(Kind::Chat, json!({"n": n}), Leg::Colocated).unwrap_err();
        assert_eq!(e, RequestError::MultipleChoices);
        assert_eq!(e.to_string(), "n > 1 is not supported over gRPC");
    }
}

#[test]
fn fields_grpc_cannot_carry_are_refused_by_name() {
    let cases: &[(Kind, Value, &str)] = &[
        (Kind::Completions, json!({"logprobs": 0}), "logprobs"),
        (Kind::Completions, json!({"logprobs": 2}), "logprobs"),
        (Kind::Completions, json!({"echo": true}), "echo"),
        (Kind::Completions, json!({"suffix": "s"}), "suffix"),
        (
            Kind::Completions,
            json!({"prompt_embeds": "AAAA"}),
            "prompt_embeds",
        ),
        (Kind::Chat, json!({"logprobs": true}), "logprobs"),
        (Kind::Chat, json!({"top_logprobs": 2}), "top_logprobs"),
        (Kind::Chat, json!({"prompt_logprobs": 0}), "prompt_logprobs"),
        (
            Kind::Completions,
            json!({"prompt_logprobs": 1}),
            "prompt_logprobs",
        ),
        (
            Kind::Chat,
            json!({"response_format": {"type": "json_object"}}),
            "response_format",
        ),
        (
            Kind::Completions,
            json!({"response_format": {"type": "json_schema", "json_schema": {}}}),
            "response_format",
        ),
        (
            Kind::Chat,
            json!({"structured_outputs": {"choice": ["a"]}}),
            "structured_outputs",
        ),
        (Kind::Chat, json!({"guided_json": {}}), "guided_json"),
        (Kind::Chat, json!({"guided_choice": ["a"]}), "guided_choice"),
        (Kind::Chat, json!({"guided_regex": "a+"}), "guided_regex"),
        (Kind::Chat, json!({"best_of": 2}), "best_of"),
        (Kind::Chat, json!({"logit_bias": {"5": 10}}), "logit_bias"),
        (Kind::Chat, json!({"bad_words": ["x"]}), "bad_words"),
        (
            Kind::Chat,
            json!({"use_beam_search": true}),
            "use_beam_search",
        ),
        (
            Kind::Chat,
            json!({"return_token_ids": true}),
            "return_token_ids",
        ),
        (
            Kind::Chat,
            json!({"spaces_between_special_tokens": false}),
            "spaces_between_special_tokens",
        ),
        (
            Kind::Chat,
            json!({"truncate_prompt_tokens": -1}),
            "truncate_prompt_tokens",
        ),
    ];
    for (kind, body, field) in cases {
        let e = build(*kind, body.clone(), Leg::Colocated).unwrap_err();
        assert_eq!(e, RequestError::Unsupported(field), "{body}");
        assert_eq!(
            e.to_string(),
            format!("`{field}` is not supported by gRPC engines")
        );
    }
}

#[test]
fn defaults_of_unsupported_fields_pass() {
    let ok: &[(Kind, Value)] = &[
        (
            Kind::Completions,
            json!({"logprobs": null, "echo": false, "suffix": null}),
        ),
        (Kind::Chat, json!({"logprobs": false, "top_logprobs": 0})),
        (Kind::Chat, json!({"response_format": {"type": "text"}})),
        (
            Kind::Chat,
            json!({"best_of": null, "logit_bias": {}, "bad_words": []}),
        ),
        (
            Kind::Chat,
            json!({"prompt_logprobs": null, "return_token_ids": false}),
        ),
        (Kind::Chat, json!({"spaces_between_special_tokens": true})),
        (Kind::Chat, json!({"use_beam_search": false})),
    ];
    for (kind, body) in ok {
        assert!(build(*kind, body.clone(), Leg::Colocated).is_ok(), "{body}");
    }
}

#[test]
fn tools_are_template_input_but_a_tool_call_is_refused() {
    let tools = json!([{"type": "function", "function": {"name": "f"}}]);
    let with = |choice: Option<Value>, parser: bool| {
        let mut b = json!({"tools": tools});
        if let Some(c) = choice {
            b["tool_choice"] = c;
        }
        build_with(Kind::Chat, b, Leg::Colocated, parser)
    };
    let refused = Err(RequestError::Unsupported("tool_choice"));
    assert!(with(Some(json!("none")), true).is_ok());
    // `auto` (also the default with tools): text, unless the engine parses tool calls.
    assert!(with(None, false).is_ok());
    assert!(with(Some(json!("auto")), false).is_ok());
    assert_eq!(with(None, true).map(|_| ()), refused);
    assert_eq!(with(Some(json!("auto")), true).map(|_| ()), refused);
    // Forced calls need a grammar.
    assert_eq!(with(Some(json!("required")), false).map(|_| ()), refused);
    let named = json!({"type": "function", "function": {"name": "f"}});
    assert_eq!(with(Some(named), false).map(|_| ()), refused);
    // Without tools every choice is "none" (vLLM follows OpenAI).
    for tc in [json!("required"), json!("auto")] {
        let b = json!({"tools": [], "tool_choice": tc});
        assert!(build_with(Kind::Chat, b, Leg::Colocated, true).is_ok());
    }
}

#[test]
fn the_prefill_leg_asks_for_one_token_and_keeps_the_kv() {
    let body = json!({"max_tokens": 50, "min_tokens": 10, "stop": ["x"], "temperature": 0.3});
    let r = build(Kind::Chat, body.clone(), Leg::Prefill).unwrap();
    let st = r.stopping.as_ref().unwrap();
    assert_eq!(st.max_new_tokens, 1);
    assert_eq!(st.min_new_tokens, 0, "min > max would be INVALID_ARGUMENT");
    assert_eq!(st.stop_strings, ["x"], "stop strings kept");
    let kv = r.kv.as_ref().unwrap().kv_transfer_params.as_ref().unwrap();
    assert_eq!(
        struct_to_json(kv),
        json!({"do_remote_decode": true, "do_remote_prefill": false})
    );
    // Otherwise the colocated request.
    let mut c = build(Kind::Chat, body, Leg::Colocated).unwrap();
    c.stopping = r.stopping.clone();
    c.kv = r.kv.clone();
    assert_eq!(c, r);
}

fn p_params() -> prost_types::Struct {
    json_to_struct(&json!({
        "do_remote_prefill": true, "do_remote_decode": false,
        "remote_block_ids": [3, 4, 5], "remote_engine_id": "eng-p",
        "remote_request_id": "req-1-0a1b2c3d", "remote_host": "10.0.0.2",
        "remote_port": 5600, "tp_size": 1, "remote_blocks_expiry_time": null,
    }))
    .unwrap()
}

#[test]
fn the_decode_leg_is_colocated_plus_p_params_with_a_string_port() {
    let body = json!({"max_tokens": 50, "min_tokens": 10, "stream": true});
    let r = build(
        Kind::Chat,
        body.clone(),
        Leg::Decode {
            kv_transfer_params: p_params(),
        },
    )
    .unwrap();
    let kv = r.kv.as_ref().unwrap().kv_transfer_params.as_ref().unwrap();
    // Verbatim but for the port.
    let mut want = p_params();
    want.fields.insert("remote_port".into(), string("5600"));
    assert_eq!(kv, &want);
    assert_eq!(
        kv.fields["remote_block_ids"],
        p_params().fields["remote_block_ids"]
    );
    assert_eq!(
        kv.fields["tp_size"],
        num(1.0),
        "only the port is stringified"
    );
    let mut c = build(Kind::Chat, body, Leg::Colocated).unwrap();
    assert_eq!(c.stopping.as_ref().unwrap().min_new_tokens, 10);
    c.kv = r.kv.clone();
    assert_eq!(c, r);
}

#[test]
fn remote_port_stringification() {
    let port = |v: prost_types::Value| {
        let mut s = prost_types::Struct::default();
        s.fields.insert("remote_port".into(), v);
        stringify_remote_port(s)
            .fields
            .remove("remote_port")
            .unwrap()
    };
    assert_eq!(port(num(5600.0)), string("5600"));
    assert_eq!(port(string("5600")), string("5600"), "already a string");
    assert_eq!(port(num(5600.5)), string("5600.5"));
    let null = prost_types::Value {
        kind: Some(PbKind::NullValue(0)),
    };
    assert_eq!(port(null.clone()), null, "anything else is left as is");
    // No port: nothing added.
    assert!(stringify_remote_port(prost_types::Struct::default())
        .fields
        .is_empty());
}

#[test]
fn cache_salt_rides_in_the_kv_parameters() {
    let r = chat(json!({"cache_salt": "s1"}));
    let kv = r.kv.unwrap();
    assert_eq!(kv.cache_salt, "s1");
    assert!(kv.kv_transfer_params.is_none());
    let r = build(Kind::Chat, json!({"cache_salt": "s1"}), Leg::Prefill).unwrap();
    let kv = r.kv.unwrap();
    assert_eq!(kv.cache_salt, "s1");
    assert!(kv.kv_transfer_params.is_some());
}

#[test]
fn struct_round_trips_keep_integers_integers() {
    let v = json!({
        "remote_port": 5600, "port_str": "5600", "remote_block_ids": [1, 2, 9007199254740992u64],
        "nested": {"groups": [[1, 2], [3]], "neg": -3, "half": 0.5},
        "flag": true, "none": null, "big": 9007199254740994u64,
    });
    let s = json_to_struct(&v).unwrap();
    // On the wire every number is a double.
    assert_eq!(s.fields["remote_port"], num(5600.0));
    assert_eq!(s.fields["port_str"], string("5600"));
    let back = struct_to_json(&s);
    assert_eq!(back["remote_port"], json!(5600));
    assert!(back["remote_port"].is_u64(), "5600.0 comes back an integer");
    assert_eq!(back["port_str"], json!("5600"), "a string stays a string");
    assert_eq!(back["remote_block_ids"], json!([1, 2, 9007199254740992u64]));
    assert!(back["remote_block_ids"][0].is_u64());
    assert_eq!(
        back["nested"],
        json!({"groups": [[1, 2], [3]], "half": 0.5, "neg": -3})
    );
    assert!(back["nested"]["neg"].is_i64());
    assert_eq!(back["flag"], json!(true));
    assert_eq!(back["none"], Value::Null);
    // Past 2^53 a double is not necessarily the integer meant: it stays a float.
    assert!(back["big"].is_f64());
    // Keys come back sorted (a Struct is a sorted map); values as sent.
    let keys: Vec<&str> = back
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let mut sorted = keys.clone();
    sorted.sort_unstable();
    assert_eq!(keys, sorted);
}

#[test]
fn struct_to_json_edge_numbers() {
    let mut s = prost_types::Struct::default();
    for (k, n) in [
        ("neg0", -0.0),
        ("nan", f64::NAN),
        ("inf", f64::INFINITY),
        ("f", 1.25),
    ] {
        s.fields.insert(k.into(), num(n));
    }
    s.fields
        .insert("unset".into(), prost_types::Value { kind: None });
    let j = struct_to_json(&s);
    assert_eq!(j["neg0"], json!(0));
    assert_eq!(j["nan"], Value::Null);
    assert_eq!(j["inf"], Value::Null);
    assert_eq!(j["f"], json!(1.25));
    assert_eq!(j["unset"], Value::Null);
}

#[test]
fn only_objects_become_structs() {
    assert!(json_to_struct(&json!([1])).is_none());
    assert!(json_to_struct(&json!("x")).is_none());
    assert!(json_to_struct(&Value::Null).is_none());
    assert_eq!(
        json_to_struct(&json!({})),
        Some(prost_types::Struct::default())
    );
}

#[test]
fn an_http_prefill_params_json_goes_to_a_grpc_decode_with_a_string_port() {
    // P answered over HTTP (integers); D speaks gRPC.
    let p = json!({"do_remote_prefill": true, "remote_port": 5601, "remote_block_ids": [7]});
    let s = json_to_struct(&p).unwrap();
    let r = build(
        Kind::Completions,
        json!({"prompt": "x"}),
        Leg::Decode {
            kv_transfer_params: s,
        },
    )
    .unwrap();
    let kv = struct_to_json(r.kv.unwrap().kv_transfer_params.as_ref().unwrap());
    assert_eq!(
        kv,
        json!({"do_remote_prefill": true, "remote_block_ids": [7], "remote_port": "5601"})
    );
}
