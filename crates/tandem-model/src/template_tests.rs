use std::path::Path;

use serde_json::json;

use super::*;
use crate::chat::normalise_messages;
use crate::tokenizer::Tokenizer;

fn tmpl(src: &str) -> ChatTemplate {
    ChatTemplate::new(TemplateSource::Single(src.into()), "test", Map::new()).unwrap()
}

fn render(t: &ChatTemplate, messages: &[Json], inputs: ChatInputs<'_>) -> String {
    t.render(&normalise_messages(messages).unwrap(), true, inputs)
        .unwrap()
}

fn hello() -> Vec<Json> {
    vec![
        json!({"role": "system", "content": "You are helpful."}),
        json!({"role": "user", "content": "Hello"}),
    ]
}

#[test]
fn python_string_methods_slicing_and_namespace_work() {
    // The constructs Qwen3's template is built from.
    let t = tmpl(concat!(
        "{%- set ns = namespace(last_user=messages|length - 1) %}\n",
        "{%- for m in messages[::-1] %}\n",
        "{%- set i = (messages|length - 1) - loop.index0 %}\n",
        "{%- if m.role == 'user' and not (m.content.startswith('<tool_response>') and m.content.endswith('</tool_response>')) %}\n",
        "{%- set ns.last_user = i %}{% break %}\n",
        "{%- endif %}\n",
        "{%- endfor %}\n",
        "{%- for m in messages %}\n",
        "{%- if '</think>' in m.content %}\n",
        "{%- set c = m.content.split('</think>')[-1].lstrip('\\n') %}\n",
        "{%- set r = m.content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}\n",
        "[{{ loop.index0 }}:{{ r.strip() }}|{{ c }}]\n",
        "{%- else %}\n",
        "[{{ loop.index0 }}:{{ m.content.strip() }}]\n",
        "{%- endif %}\n",
        "{%- endfor %}\n",
        "last_user={{ ns.last_user }}",
        "{%- for k, v in {'a': 1, 'b': 2}.items() %} {{ k }}={{ v }}{% endfor %}",
    ));
    let msgs = [
        json!({"role": "user", "content": "  q1 "}),
        json!({"role": "assistant", "content": "<think>\nhmm\n</think>\n\nanswer"}),
        json!({"role": "user", "content": "<tool_response>x</tool_response>"}),
    ];
    assert_eq!(
        render(&t, &msgs, ChatInputs::default()),
        "[0:q1][1:hmm|answer][2:<tool_response>x</tool_response>]last_user=0 a=1 b=2"
    );
}

#[test]
fn trim_and_lstrip_blocks_are_on_as_in_transformers() {
    let t = tmpl("{% for m in messages %}\n    {% if true %}\n{{ m.content }}\n    {% endif %}\n{% endfor %}\n");
    assert_eq!(
        render(&t, &hello(), ChatInputs::default()),
        "You are helpful.\nHello\n"
    );
}

#[test]
fn tojson_prints_as_python_json_dumps() {
    let t = tmpl("{% for t in tools %}{{ t | tojson }}\n{% endfor %}");
    let tools = json!([{"type": "function", "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "Zürich <b>&</b> \"q\""}},
            "required": ["city"], "z": 1.5, "a": 1e20, "m": 0.0001, "n": 1.0}
    }}]);
    let out = render(
        &t,
        &hello(),
        ChatInputs {
            tools: Some(&tools),
            ..Default::default()
        },
    );
    // Python: json.dumps(tool, ensure_ascii=False) of vLLM's model_dump() of the tool.
    assert_eq!(
        out,
        concat!(
            r#"{"type": "function", "function": {"name": "get_weather", "description": null, "#,
            r#""parameters": {"type": "object", "properties": {"city": {"type": "string", "#,
            r#""description": "Zürich <b>&</b> \"q\""}}, "required": ["city"], "z": 1.5, "#,
            r#""a": 1e+20, "m": 0.0001, "n": 1.0}}}"#,
            "\n"
        )
    );
}

#[test]
fn tojson_options_follow_transformers() {
    let t = tmpl(concat!(
        "{{ {'b': [1, {}], 'a': []} | tojson(indent=2) }}|",
        "{{ {'b': 1, 'a': 'é'} | tojson(sort_keys=true, separators=(',', ':')) }}|",
        "{{ 'é\u{7f}\n' | tojson(true) }}|",
        "{{ [1, 2] | tojson(indent='\t') }}"
    ));
    assert_eq!(
        render(&t, &hello(), ChatInputs::default()),
        "{\n  \"b\": [\n    1,\n    {}\n  ],\n  \"a\": []\n}|{\"a\":\"é\",\"b\":1}|\"\\u00e9\\u007f\\n\"|[\n\t1,\n\t2\n]"
    );
}

#[test]
fn raise_exception_fails_the_render_with_the_templates_message() {
    let t = tmpl("{% if messages[-1].role == 'assistant' %}{{ raise_exception('Last message must not be the assistant') }}{% endif %}ok");
    assert_eq!(render(&t, &hello(), ChatInputs::default()), "ok");
    let msgs = normalise_messages(&[json!({"role": "assistant", "content": "x"})]).unwrap();
    let err = t.render(&msgs, true, ChatInputs::default()).unwrap_err();
    assert!(matches!(err, TokenizerError::Template(_)));
    assert_eq!(
        err.to_string(),
        "invalid chat template: Last message must not be the assistant"
    );
}

#[test]
fn tools_absent_are_none_and_present_are_listed() {
    let t = tmpl(
        "{% if tools %}T{{ tools|length }}{% elif tools is none %}none{% endif %}|{{ documents }}",
    );
    assert_eq!(render(&t, &hello(), ChatInputs::default()), "none|None");
    let null = Json::Null;
    let nulls = ChatInputs {
        tools: Some(&null),
        documents: Some(&null),
        ..Default::default()
    };
    assert_eq!(render(&t, &hello(), nulls), "none|None");
    let tools =
        json!([{"type": "function", "function": {"name": "a"}}, {"function": {"name": "b"}}]);
    let inputs = ChatInputs {
        tools: Some(&tools),
        ..Default::default()
    };
    assert_eq!(render(&t, &hello(), inputs), "T2|None");
    let bad = json!({"name": "a"});
    let err = t
        .render(
            &hello(),
            true,
            ChatInputs {
                tools: Some(&bad),
                ..Default::default()
            },
        )
        .unwrap_err();
    assert!(matches!(err, TokenizerError::Input(_)));
}

#[test]
fn chat_template_kwargs_are_template_variables() {
    let t = tmpl(concat!(
        "{{ messages[-1].content }}",
        "{%- if add_generation_prompt %}<A>{% if enable_thinking is defined and enable_thinking is false %}<think></think>{% endif %}{% endif %}"
    ));
    assert_eq!(render(&t, &hello(), ChatInputs::default()), "Hello<A>");
    let kw = json!({"enable_thinking": false});
    let inputs = ChatInputs {
        chat_template_kwargs: Some(&kw),
        ..Default::default()
    };
    assert_eq!(render(&t, &hello(), inputs), "Hello<A><think></think>");
    // vLLM lays the kwargs over its own arguments.
    let kw = json!({"add_generation_prompt": false});
    let inputs = ChatInputs {
        chat_template_kwargs: Some(&kw),
        ..Default::default()
    };
    assert_eq!(render(&t, &hello(), inputs), "Hello");
    let kw = json!([1]);
    let inputs = ChatInputs {
        chat_template_kwargs: Some(&kw),
        ..Default::default()
    };
    assert!(t.render(&hello(), true, inputs).is_err());
}

#[test]
fn values_print_as_python_prints_them() {
    let t = tmpl(
        "{{ none }} {{ true }} {{ false }} {{ undefined_thing }}|{{ strftime_now('%Y') | length }}",
    );
    assert_eq!(
        render(&t, &hello(), ChatInputs::default()),
        "None True False |4"
    );
}

#[test]
fn list_form_uses_default_or_tool_use_with_tools() {
    let src = TemplateSource::Named(vec![
        ("default".into(), "plain".into()),
        ("tool_use".into(), "tools:{{ tools|length }}".into()),
    ]);
    let t = ChatTemplate::new(src, "test", Map::new()).unwrap();
    assert_eq!(render(&t, &hello(), ChatInputs::default()), "plain");
    let tools = json!([]);
    let inputs = ChatInputs {
        tools: Some(&tools),
        ..Default::default()
    };
    // transformers picks `tool_use` whenever tools are passed, even an empty list.
    assert_eq!(render(&t, &hello(), inputs), "tools:0");
    let only_tools = TemplateSource::Named(vec![("tool_use".into(), "x".into())]);
    let err = ChatTemplate::new(only_tools, "cfg.json", Map::new()).unwrap_err();
    assert!(
        err.to_string().contains("none is named \"default\""),
        "{err}"
    );
}

#[test]
fn start_up_check_rejects_templates_that_cannot_render_a_conversation() {
    let cases = [
        ("{{ raise_exception('nope') }}", "nope"),
        (
            "{% if messages[0].role != 'system' %}{{ raise_exception('a system message is required') }}{% endif %}",
            "cannot render a user-only conversation: a system message is required",
        ),
        ("{{ messages[0].content.no_such_method() }}", "no_such_method"),
        ("{% for %}", "syntax error"),
    ];
    for (src, why) in cases {
        let err = ChatTemplate::new(
            TemplateSource::Single(src.into()),
            "/m/tmpl.jinja",
            Map::new(),
        )
        .unwrap_err();
        assert!(matches!(err, TokenizerError::BadTemplate { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.starts_with("chat template /m/tmpl.jinja is unusable: "),
            "{msg}"
        );
        assert!(msg.contains(why), "{msg}");
    }
    // A broken `tool_use` template is checked with a tool.
    let src = TemplateSource::Named(vec![
        ("default".into(), "ok".into()),
        (
            "tool_use".into(),
            "{{ tools[0].function.name.nope() }}".into(),
        ),
    ]);
    let err = ChatTemplate::new(src, "cfg", Map::new()).unwrap_err();
    assert!(err.to_string().contains("with tools"), "{err}");
}

/// A word-level `tokenizer.json` small enough to write inline.
fn write_tokenizer(dir: &Path) {
    let added: Vec<Json> = ["<s>", "</s>", "<|im_end|>"]
        .iter()
        .enumerate()
        .map(|(i, t)| {
            json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let tok = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": {"<s>": 0, "</s>": 1, "<|im_end|>": 2,
            "hello": 3, "world": 4, "[UNK]": 5}, "unk_token": "[UNK]"}
    });
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
}

#[test]
fn model_directory_config_gives_template_and_special_tokens() {
    let dir = tempfile::tempdir().unwrap();
    write_tokenizer(dir.path());
    let cfg = json!({
        "add_bos_token": true,
        "bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": false},
        "eos_token": {"__type": "AddedToken", "content": "</s>"},
        "pad_token": "<|im_end|>",
        "unk_token": null,
        "chat_template": "{{ bos_token }}{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}[{{ pad_token }}|{{ unk_token }}]",
    });
    std::fs::write(dir.path().join("tokenizer_config.json"), cfg.to_string()).unwrap();
    for path in [dir.path().to_path_buf(), dir.path().join("tokenizer.json")] {
        let t = Tokenizer::from_file(&path).unwrap();
        assert_eq!(t.eos(), 1);
        let msgs = [json!({"role": "user", "content": "hello"})];
        let s = t
            .render_chat(
                &normalise_messages(&msgs).unwrap(),
                true,
                ChatInputs::default(),
            )
            .unwrap();
        assert_eq!(s, "<s>hello</s>[<|im_end|>|]");
        // `add_bos_token` with a post-processor that adds none: the BOS is prepended.
        assert_eq!(t.encode("hello world", true).unwrap(), vec![0, 3, 4]);
        assert_eq!(t.encode("hello world", false).unwrap(), vec![3, 4]);
    }
    // An explicit template file wins, and the model's template is then not checked.
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        json!({"eos_token": "<|im_end|>", "chat_template": "{{ raise_exception('broken') }}"})
            .to_string(),
    )
    .unwrap();
    assert!(Tokenizer::from_file(dir.path()).is_err());
    let file = dir.path().join("override.jinja");
    std::fs::write(&file, "{{ messages[0].content }}!").unwrap();
    let t = Tokenizer::load(Some(dir.path()), Some(&file)).unwrap();
    assert_eq!(t.eos(), 2);
    let s = t
        .render_chat(&hello(), true, ChatInputs::default())
        .unwrap();
    assert_eq!(s, "You are helpful.!");
}

#[test]
fn list_form_and_jinja_file_in_the_model_directory() {
    let dir = tempfile::tempdir().unwrap();
    write_tokenizer(dir.path());
    let cfg = json!({"chat_template": [
        {"name": "default", "template": "D"},
        {"name": "tool_use", "template": "T"},
    ]});
    std::fs::write(dir.path().join("tokenizer_config.json"), cfg.to_string()).unwrap();
    let t = Tokenizer::from_file(dir.path()).unwrap();
    let tools = json!([]);
    let with_tools = ChatInputs {
        tools: Some(&tools),
        ..Default::default()
    };
    assert_eq!(
        t.render_chat(&hello(), true, ChatInputs::default())
            .unwrap(),
        "D"
    );
    assert_eq!(t.render_chat(&hello(), true, with_tools).unwrap(), "T");
    // transformers prefers `chat_template.jinja` to the config's template.
    std::fs::write(dir.path().join("chat_template.jinja"), "J\n").unwrap();
    let t = Tokenizer::from_file(dir.path()).unwrap();
    assert_eq!(t.render_chat(&hello(), true, with_tools).unwrap(), "J");
}

#[test]
fn missing_files_name_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let err = Tokenizer::from_file(dir.path()).unwrap_err();
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
    write_tokenizer(dir.path());
    std::fs::write(dir.path().join("tokenizer_config.json"), "{not json").unwrap();
    let err = Tokenizer::from_file(dir.path()).unwrap_err();
    assert!(err.to_string().contains("tokenizer_config.json"), "{err}");
    let err = Tokenizer::load(None, Some(&dir.path().join("nope.jinja"))).unwrap_err();
    assert!(err.to_string().contains("nope.jinja"), "{err}");
}
