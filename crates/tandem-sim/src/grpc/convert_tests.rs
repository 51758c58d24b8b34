use prost_types::value::Kind;
use serde_json::json;
use tonic::Code;
use vllm_proto::generate_request::Prompt;
use vllm_proto::{
    DecodingParameters, GenerateRequest, KvCacheParameters, RandomSampling, ResponseOptions,
    StoppingCriteria, TokenIds,
};

use super::*;

fn lim() -> Limits {
    Limits {
        served_model_name: "m".into(),
        max_model_len: 100,
        vocab_size: 1000,
    }
}

fn ids(v: &[u32]) -> Option<Prompt> {
    Some(Prompt::TokenIds(TokenIds { ids: v.to_vec() }))
}

fn req() -> GenerateRequest {
    GenerateRequest {
        request_id: "r".into(),
        prompt: ids(&[1, 2, 3]),
        ..Default::default()
    }
}

fn stopping(max: u32, min: u32) -> Option<StoppingCriteria> {
    Some(StoppingCriteria {
        max_new_tokens: max,
        min_new_tokens: min,
        ..Default::default()
    })
}

/// Byte-level stand-in: one token per byte.
fn bytes(s: &str) -> Result<Vec<u32>, String> {
    Ok(s.bytes().map(u32::from).collect())
}

fn run(r: GenerateRequest) -> Result<Converted, Status> {
    convert(r, &lim(), bytes, || "fresh".into())
}

fn err(r: GenerateRequest) -> Status {
    run(r).expect_err("rejected")
}

#[test]
fn defaults_fill_the_context_and_keep_the_id() {
    let c = run(req()).unwrap();
    assert_eq!(c.request_id, "r");
    assert_eq!(&*c.prompt, &[1, 2, 3]);
    // max_new_tokens = 0 means "to the context limit", not the proto comment's 20.
    assert_eq!(c.params.max_tokens, 97);
    assert_eq!(c.params.min_tokens, 0);
    assert_eq!(c.params.seed, None);
    assert!(matches!(c.role, Role::Colocated));
    assert_eq!(
        c.opts,
        ResponseOpts {
            prompt_token_ids: false,
            output_text: true,
            output_token_ids: false
        }
    );
    let c = run(GenerateRequest {
        request_id: String::new(),
        ..req()
    })
    .unwrap();
    assert_eq!(c.request_id, "fresh");
}

#[test]
fn max_new_tokens_is_capped_to_the_context_and_text_is_tokenized() {
    let c = run(GenerateRequest {
        prompt: Some(Prompt::Text("abcd".into())),
        stopping: stopping(500, 0),
        sampling: Some(RandomSampling {
            seed: Some(7),
            ..Default::default()
        }),
        ..req()
    })
    .unwrap();
    assert_eq!(&*c.prompt, &[97, 98, 99, 100]);
    assert_eq!(c.params.max_tokens, 96);
    assert_eq!(c.params.seed, Some(7));
}

#[test]
fn validations_have_vllms_codes_and_messages() {
    let e = err(GenerateRequest {
        model: "other".into(),
        ..req()
    });
    assert_eq!(e.code(), Code::NotFound);
    assert_eq!(e.message(), "model `other` not found");
    assert!(run(GenerateRequest {
        model: "m".into(),
        ..req()
    })
    .is_ok());

    let e = err(GenerateRequest {
        prompt: None,
        ..req()
    });
    assert_eq!(
        (e.code(), e.message()),
        (Code::InvalidArgument, "prompt is required")
    );

    let e = err(GenerateRequest {
        stopping: stopping(4, 5),
        ..req()
    });
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(
        e.message(),
        "`min_tokens` must be less than or equal to `max_tokens`, got min_tokens=5, max_tokens=4"
    );
    // min is checked against the resolved max: unset max is the room left (97).
    assert!(run(GenerateRequest {
        stopping: stopping(0, 97),
        ..req()
    })
    .is_ok());
    assert_eq!(
        err(GenerateRequest {
            stopping: stopping(0, 98),
            ..req()
        })
        .code(),
        Code::InvalidArgument
    );

    let e = err(GenerateRequest {
        sampling: Some(RandomSampling {
            num_sequences: 2,
            ..Default::default()
        }),
        ..req()
    });
    assert_eq!(
        (e.code(), e.message()),
        (Code::InvalidArgument, "num_sequences > 1 is not supported")
    );
    // 0 and 1 both mean one sequence.
    assert!(run(GenerateRequest {
        sampling: Some(RandomSampling {
            num_sequences: 1,
            ..Default::default()
        }),
        ..req()
    })
    .is_ok());

    let e = err(GenerateRequest {
        prompt: ids(&[1; 100]),
        ..req()
    });
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(
        e.message(),
        "this model's maximum context length is 100 tokens, but the prompt contains 100 input tokens"
    );
    assert!(run(GenerateRequest {
        prompt: ids(&[1; 99]),
        ..req()
    })
    .is_ok());

    let e = err(GenerateRequest {
        prompt: ids(&[]),
        ..req()
    });
    assert_eq!(
        e.message(),
        "text request `r` must contain at least one prompt token ID"
    );
    let e = err(GenerateRequest {
        prompt: ids(&[5, 1000]),
        ..req()
    });
    assert_eq!(
        e.message(),
        "prompt contains out-of-vocab token id 1000; vocabulary size is 1000"
    );
    let e = err(GenerateRequest {
        stopping: Some(StoppingCriteria {
            stop_strings: vec!["x".into(), String::new()],
            ..Default::default()
        }),
        ..req()
    });
    assert_eq!(e.message(), "text request `r` stop strings cannot be empty");
    let e = err(GenerateRequest {
        lora_name: "a".into(),
        ..req()
    });
    assert_eq!(e.code(), Code::FailedPrecondition);
}

#[test]
fn sampling_ranges_are_checked() {
    let with_temp = |t: f32| GenerateRequest {
        temperature: Some(t),
        ..req()
    };
    assert!(run(with_temp(0.0)).is_ok());
    assert!(run(with_temp(2.0)).is_ok());
    assert_eq!(
        err(with_temp(-0.5)).message(),
        "temperature must be in [0, 2], got -0.5"
    );
    assert_eq!(
        err(with_temp(f32::NAN)).message(),
        "temperature must be a finite number, got NaN"
    );
    let with_top_p = |p: f32| GenerateRequest {
        sampling: Some(RandomSampling {
            top_p: Some(p),
            ..Default::default()
        }),
        ..req()
    };
    assert!(run(with_top_p(1.0)).is_ok());
    // 0.5+ made top_p optional: an explicit 0 is a value, and out of range.
    assert_eq!(
        err(with_top_p(0.0)).message(),
        "top_p must be in (0, 1], got 0"
    );
    let rep = |r: f32| GenerateRequest {
        decoding: Some(DecodingParameters {
            repetition_penalty: r,
            ..Default::default()
        }),
        ..req()
    };
    assert!(run(rep(0.0)).is_ok(), "0 is unset");
    assert_eq!(err(rep(-1.0)).code(), Code::InvalidArgument);
}

#[test]
fn unsimulated_features_are_refused_not_ignored() {
    let e = err(GenerateRequest {
        response: Some(ResponseOptions {
            output_logprobs: true,
            ..Default::default()
        }),
        ..req()
    });
    assert_eq!(e.code(), Code::Unimplemented);
}

#[test]
fn truncation_keeps_the_last_tokens() {
    let c = run(GenerateRequest {
        prompt: ids(&[1, 2, 3, 4, 5]),
        truncate_prompt_tokens: 2,
        ..req()
    })
    .unwrap();
    assert_eq!(&*c.prompt, &[4, 5]);
    let e = err(GenerateRequest {
        truncate_prompt_tokens: 60,
        stopping: stopping(50, 0),
        ..req()
    });
    assert_eq!(e.code(), Code::InvalidArgument);
}

#[test]
fn response_options_default_output_text_on() {
    let o = ResponseOpts::from_proto(Some(&ResponseOptions {
        output_token_ids: true,
        prompt_token_ids: true,
        ..Default::default()
    }));
    assert!(o.output_text && o.output_token_ids && o.prompt_token_ids);
    let o = ResponseOpts::from_proto(Some(&ResponseOptions {
        output_text: Some(false),
        ..Default::default()
    }));
    assert!(!o.output_text);
}

#[test]
fn data_parallel_rank_metadata() {
    assert_eq!(data_parallel_rank(None).unwrap(), None);
    assert_eq!(data_parallel_rank(Some(b" 0 ")).unwrap(), Some(0));
    assert_eq!(
        data_parallel_rank(Some(b"x")).unwrap_err().message(),
        "x-data-parallel-rank metadata must be an unsigned 32-bit integer"
    );
    assert_eq!(
        data_parallel_rank(Some(b"1")).unwrap_err().code(),
        Code::InvalidArgument
    );
}

fn prefill_params() -> Value {
    kv_params(
        &KvIdentity {
            engine_id: "e".into(),
            host: "127.0.0.1".into(),
            port: 5600,
            tp_size: 1,
        },
        &KvHandle {
            block_ids: vec![3, 4],
            remote_request_id: "r-0123abcd".into(),
            num_tokens: 20,
        },
    )
}

#[test]
fn params_survive_a_struct_round_trip_as_doubles() {
    let s = json_to_struct(&prefill_params()).unwrap();
    let back = struct_to_json(&s);
    // Every number is a double on the wire, as vLLM's `proto_value_to_json` passes them on.
    assert_eq!(back["remote_port"], json!(5600.0));
    assert!(back["remote_port"].is_f64());
    assert_eq!(back["remote_block_ids"], json!([3.0, 4.0]));
    let Role::Decode(r) = role_of(&back) else {
        panic!("decode role from {back}")
    };
    assert_eq!(
        r,
        RemoteKv {
            block_ids: vec![3, 4],
            engine_id: "e".into(),
            request_id: "r-0123abcd".into(),
            host: "127.0.0.1".into(),
            port: 5600,
            tp_size: 1,
        }
    );
    // Dynamo's workaround sends the port as a string.
    let mut v = back.clone();
    v["remote_port"] = json!("5600");
    assert!(matches!(role_of(&v), Role::Decode(r) if r.port == 5600));
}

#[test]
fn roles_from_params() {
    assert!(matches!(
        role_of(&json!({"do_remote_decode": true, "do_remote_prefill": false})),
        Role::Prefill
    ));
    assert!(matches!(role_of(&json!({})), Role::Colocated));
    // Claims a decode leg but lacks keys: local prefill, as vLLM's connector falls back.
    let mut v = prefill_params();
    v.as_object_mut().unwrap().remove("remote_host");
    assert!(matches!(role_of(&v), Role::Colocated));
    assert_eq!(remote_of(&v).unwrap_err(), "remote_host");
    let mut v = prefill_params();
    v["remote_port"] = json!(5600.5);
    assert_eq!(remote_of(&v).unwrap_err(), "remote_port");
    let mut v = prefill_params();
    v["remote_block_ids"] = json!([[7.0, 8.0]]);
    assert_eq!(remote_of(&v).unwrap().unwrap().block_ids, vec![7, 8]);
}

#[test]
fn kv_params_in_a_request_set_the_role() {
    let s = json_to_struct(&json!({"do_remote_decode": true})).unwrap();
    let c = run(GenerateRequest {
        kv: Some(KvCacheParameters {
            kv_transfer_params: Some(s),
            ..Default::default()
        }),
        stopping: stopping(1, 0),
        ..req()
    })
    .unwrap();
    assert!(matches!(c.role, Role::Prefill));
    assert_eq!(c.params.max_tokens, 1);
}

#[test]
fn non_finite_numbers_become_null() {
    let s = prost_types::Struct {
        fields: [(
            "x".to_string(),
            prost_types::Value {
                kind: Some(Kind::NumberValue(f64::NAN)),
            },
        )]
        .into(),
    };
    assert_eq!(struct_to_json(&s), json!({"x": null}));
}
