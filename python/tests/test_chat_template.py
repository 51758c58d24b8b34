"""Qwen3's real chat template through Tandem, against a reference rendered as vLLM renders it.

vLLM hands the conversation to transformers' `apply_chat_template`, which renders the template in
`jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
extensions=[loopcontrols])` with its own `tojson` (`json.dumps`, `ensure_ascii=False`) and the
globals `raise_exception` and `strftime_now`, passing `messages`, `tools`, `documents`,
`add_generation_prompt`, the tokenizer's special tokens and the request's `chat_template_kwargs`.
The reference below does the same with jinja2, after vLLM's own preprocessing (tool-call
arguments parsed from JSON, tools re-emitted by pydantic's `model_dump`).

Tandem's `/tokenize` of the messages must give the ids of the reference text, and `/detokenize`
of those ids must give the reference text back; the engine (the sim, which shares the renderer)
must agree. A real chat completion through Tandem (disaggregated) must give both engines the
reference ids: each sim records the prompt ids it computed for every leg (`/admin/requests`).
A template that cannot render makes `tandem serve` / `tandem sim` exit at start-up.
"""

from __future__ import annotations

import copy
import json
import subprocess
import time
from datetime import datetime
from pathlib import Path

import httpx
import jinja2
import jinja2.ext
import jinja2.sandbox
import pytest

from conftest import qwen_tokenizer_dir, tandem_bin

START_UP_TIMEOUT_S = 30.0


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' override: no HTML escaping, Python's separators.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


def _token_text(v):
    return v["content"] if isinstance(v, dict) else v


def special_tokens(config: dict) -> dict:
    """transformers' `special_tokens_map`: the special tokens that are set."""
    out = {}
    for key in ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"):
        if config.get(key) is not None:
            out[key] = _token_text(config[key])
    if config.get("additional_special_tokens"):
        out["additional_special_tokens"] = [_token_text(t) for t in config["additional_special_tokens"]]
    return out


def vllm_messages(messages: list[dict]) -> list[dict]:
    """vLLM's message preprocessing: content as one string; an assistant tool call's `arguments`
    parsed from its JSON string (`_postprocess_messages`)."""
    out = []
    for m in copy.deepcopy(messages):
        content = m.get("content")
        if content is None:
            m["content"] = ""
        elif isinstance(content, list):
            m["content"] = "\n".join(p["text"] for p in content if "text" in p)
        if m["role"] == "assistant" and isinstance(m.get("tool_calls"), list):
            for call in m["tool_calls"]:
                args = call["function"].get("arguments")
                if not args:
                    call["function"]["arguments"] = {}
                elif not isinstance(args, (dict, list)):
                    call["function"]["arguments"] = json.loads(args)
        out.append(m)
    return out


def vllm_tools(tools: list[dict] | None) -> list[dict] | None:
    """`[tool.model_dump() for tool in request.tools]`: declared fields first, unset ones null."""
    if tools is None:
        return None
    out = []
    for t in tools:
        f = t["function"]
        fn = {"name": f["name"], "description": f.get("description"), "parameters": f.get("parameters")}
        fn.update({k: v for k, v in f.items() if k not in fn})
        tool = {"type": "function", "function": fn}
        tool.update({k: v for k, v in t.items() if k not in tool})
        out.append(tool)
    return out


def reference(messages, tools=None, add_generation_prompt=True, chat_template_kwargs=None) -> str:
    config = json.loads((qwen_tokenizer_dir() / "tokenizer_config.json").read_text())
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    template = env.from_string(config["chat_template"])
    kwargs = {
        **special_tokens(config),
        "tools": vllm_tools(tools),
        "documents": None,
        "add_generation_prompt": add_generation_prompt,
        **(chat_template_kwargs or {}),
    }
    return template.render(messages=vllm_messages(messages), **kwargs)


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city — e.g. Zürich <b>&</b> \"Genève\".",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7.5},
            },
            "required": ["city"],
        },
    },
}
# No description: vLLM dumps it as null.
CLOCK = {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}

SYSTEM = {"role": "system", "content": "You are helpful."}
USER = {"role": "user", "content": "Hello"}

CASES = {
    "system_user": dict(messages=[SYSTEM, USER]),
    "user_only": dict(messages=[USER]),
    "multi_turn": dict(
        messages=[
            SYSTEM,
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "<think>\nsimple\n</think>\n\n4"},
            {"role": "user", "content": [{"type": "text", "text": "And 3+3?"}, {"type": "text", "text": "Briefly."}]},
        ]
    ),
    "tools": dict(messages=[SYSTEM, {"role": "user", "content": "Weather in Zürich?"}], tools=[WEATHER, CLOCK]),
    "tool_call_and_response": dict(
        messages=[
            {"role": "user", "content": "Weather in Zürich, in celsius?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Zürich", "unit": "celsius"}'},
                    },
                    {"id": "call_2", "type": "function", "function": {"name": "now", "arguments": ""}},
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": '{"temp": 21.5}'},
            {"role": "tool", "tool_call_id": "call_2", "name": "now", "content": "12:00"},
        ],
        tools=[WEATHER, CLOCK],
    ),
    "no_thinking": dict(messages=[SYSTEM, USER], chat_template_kwargs={"enable_thinking": False}),
    # The last turn is the assistant's (after the last user query: its reasoning is kept).
    "assistant_last": dict(
        messages=[USER, {"role": "assistant", "content": "<think>\nplan\n</think>\n\nHi there"}],
        add_generation_prompt=False,
    ),
}


def post(http: httpx.Client, url: str, body: dict) -> dict:
    r = http.post(url, json=body)
    assert r.status_code == 200, f"{url}: {r.status_code} {r.text}"
    return r.json()


@pytest.mark.parametrize("case", sorted(CASES))
def test_qwen3_template_renders_as_vllm_does(qwen_cluster, case):
    spec = CASES[case]
    add_gen = spec.get("add_generation_prompt", True)
    ref = reference(
        spec["messages"],
        tools=spec.get("tools"),
        add_generation_prompt=add_gen,
        chat_template_kwargs=spec.get("chat_template_kwargs"),
    )
    if case == "tools":
        assert '"description": null' in ref and "Zürich <b>&</b>" in ref, ref
    if case == "tool_call_and_response":
        assert '"arguments": {"city": "Zürich", "unit": "celsius"}}' in ref, ref
    if case == "assistant_last":
        assert ref.endswith("<think>\nplan\n</think>\n\nHi there<|im_end|>\n"), ref
    if case == "no_thinking":
        assert ref.endswith("<think>\n\n</think>\n\n"), ref
    model = qwen_cluster.model
    chat = {"model": model, "messages": spec["messages"], "add_generation_prompt": add_gen}
    for key in ("tools", "chat_template_kwargs"):
        if key in spec:
            chat[key] = spec[key]
    with httpx.Client(timeout=30.0) as http:
        ours = post(http, f"{qwen_cluster.tandem}/tokenize", chat)["tokens"]
        text = post(
            http, f"{qwen_cluster.tandem}/tokenize", {"model": model, "prompt": ref, "add_special_tokens": False}
        )["tokens"]
        assert ours == text
        back = post(http, f"{qwen_cluster.tandem}/detokenize", {"model": model, "tokens": ours})["prompt"]
        assert back == ref
        # The engine renders with the same code: its ids and text must agree.
        engine = post(http, f"{qwen_cluster.prefill}/tokenize", {**chat, "add_special_tokens": False})["tokens"]
        assert engine == ours
        engine_back = post(http, f"{qwen_cluster.prefill}/detokenize", {"model": model, "tokens": ours})["prompt"]
        assert engine_back == ref


def test_chat_completion_with_tools_is_served(qwen_cluster):
    # The whole path (render, route, prefill, decode) with tools and kwargs in the body.
    body = {
        "model": qwen_cluster.model,
        "messages": CASES["tool_call_and_response"]["messages"],
        "tools": [WEATHER, CLOCK],
        "chat_template_kwargs": {"enable_thinking": False},
        "max_tokens": 4,
    }
    with httpx.Client(timeout=30.0) as http:
        r = http.post(f"{qwen_cluster.tandem}/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        ref = reference(body["messages"], tools=body["tools"], chat_template_kwargs=body["chat_template_kwargs"])
        expected = post(
            http,
            f"{qwen_cluster.tandem}/tokenize",
            {"model": qwen_cluster.model, "prompt": ref, "add_special_tokens": False},
        )["count"]
        assert r.json()["usage"]["prompt_tokens"] == expected


def run_to_exit(argv: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(
            argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=START_UP_TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{' '.join(argv)} still running after {START_UP_TIMEOUT_S:.0f}s; expected a start-up failure")


def serve_config(work: Path, model_toml: str) -> Path:
    # Endpoints nobody listens on: start-up must fail before any engine matters.
    config = work / "tandem.toml"
    config.write_text(
        "[server]\n"
        'listen = "127.0.0.1:0"\n'
        f"{model_toml}"
        "[pools.prefill]\n"
        'endpoints = ["http://127.0.0.1:9"]\n'
        "[pools.decode]\n"
        'endpoints = ["http://127.0.0.1:9"]\n'
    )
    return config


def test_a_template_that_cannot_render_fails_start_up(tmp_path):
    tok = qwen_tokenizer_dir()
    broken = tmp_path / "broken.jinja"
    broken.write_text("{{ raise_exception('nope: this template always fails') }}")
    binary = str(tandem_bin())

    model = f"[model]\ntokenizer = {json.dumps(str(tok))}\nchat_template = {json.dumps(str(broken))}\n"
    done = run_to_exit([binary, "serve", "--config", str(serve_config(tmp_path, model))])
    assert done.returncode != 0, done
    assert "nope: this template always fails" in done.stderr, done.stderr
    assert str(broken) in done.stderr, done.stderr

    done = run_to_exit(
        [binary, "sim", "--port", "0", "--model", "qwen3-0.6b", "--tokenizer", str(tok), "--chat-template", str(broken)]
    )
    assert done.returncode != 0, done
    assert "nope: this template always fails" in done.stderr, done.stderr


def test_a_model_directory_whose_template_fails_start_up(tmp_path):
    # The model's own template (tokenizer_config.json) is checked too: here it needs a method
    # neither Python nor Tandem has.
    tok = qwen_tokenizer_dir()
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "tokenizer.json").symlink_to(tok / "tokenizer.json")
    config = json.loads((tok / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ messages[0].content.no_such_method() }}"
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    binary = str(tandem_bin())
    config = serve_config(tmp_path, f"[model]\ntokenizer = {json.dumps(str(model_dir))}\n")
    done = run_to_exit([binary, "serve", "--config", str(config)])
    assert done.returncode != 0, done
    assert "no_such_method" in done.stderr and "tokenizer_config.json" in done.stderr, done.stderr
    done = run_to_exit([binary, "sim", "--port", "0", "--model", "qwen3-0.6b", "--tokenizer", str(model_dir)])
    assert done.returncode != 0, done
    assert "no_such_method" in done.stderr, done.stderr


def engine_prompts(http: httpx.Client, base: str, request_id: str) -> list:
    """The `prompt_token_ids` an engine recorded for each chat leg with this `x-request-id`
    (the sim's `/admin/requests`: what it tokenized from the body it was sent)."""
    r = http.get(f"{base}/admin/requests")
    assert r.status_code == 200, r.text
    return [
        rec["prompt_token_ids"]
        for rec in r.json()["requests"]
        if rec["x_request_id"] == request_id and rec["path"] == "/v1/chat/completions"
    ]


def coordinator_record(http: httpx.Client, base: str, request_id: str) -> dict:
    """Tandem's record of a finished request (written as the response ends: polled, bounded)."""
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        r = http.get(f"{base}/admin/requests")
        assert r.status_code == 200, r.text
        for rec in r.json():
            if rec.get("request_id") == request_id and rec.get("outcome") is not None:
                return rec
        time.sleep(0.05)
    raise AssertionError(f"no /admin/requests record for {request_id}")


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_a_disaggregated_chat_gives_both_engines_the_reference_prompt_ids(qwen_cluster, case, stream):
    # The ids each engine computed for a real chat completion through Tandem (mode "always"),
    # not a side endpoint: a body Tandem altered on the way (tools, template kwargs or messages
    # dropped or re-serialised) would give the engines another prompt.
    spec = CASES[case]
    add_gen = spec.get("add_generation_prompt", True)
    ref = reference(
        spec["messages"],
        tools=spec.get("tools"),
        add_generation_prompt=add_gen,
        chat_template_kwargs=spec.get("chat_template_kwargs"),
    )
    model = qwen_cluster.model
    request_id = f"template-{case}-{'sse' if stream else 'json'}"
    body = {"model": model, "messages": spec["messages"], "add_generation_prompt": add_gen, "max_tokens": 2}
    for key in ("tools", "chat_template_kwargs"):
        if key in spec:
            body[key] = spec[key]
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    with httpx.Client(timeout=30.0) as http:
        want = post(http, f"{qwen_cluster.tandem}/tokenize", {"model": model, "prompt": ref, "add_special_tokens": False})
        ref_ids = want["tokens"]
        # The reference text's ids are the engine's own tokenization of it, too.
        engine_ids = post(
            http, f"{qwen_cluster.prefill}/tokenize", {"model": model, "prompt": ref, "add_special_tokens": False}
        )["tokens"]
        assert engine_ids == ref_ids
        assert len(ref_ids) > 5, ref_ids

        r = http.post(f"{qwen_cluster.tandem}/v1/chat/completions", json=body, headers={"x-request-id": request_id})
        assert r.status_code == 200, r.text
        if stream:
            events = [line[len("data: ") :] for line in r.text.split("\n\n") if line.startswith("data: ")]
            assert events[-1] == "[DONE]", r.text
            usage = [json.loads(e)["usage"] for e in events[:-1] if json.loads(e).get("usage")]
            assert len(usage) == 1, r.text
            usage = usage[0]
        else:
            usage = r.json()["usage"]
        assert usage["prompt_tokens"] == len(ref_ids), usage

        # One prefill leg and one decode leg, each with exactly the reference prompt.
        assert engine_prompts(http, qwen_cluster.prefill, request_id) == [[ref_ids]]
        assert engine_prompts(http, qwen_cluster.decode, request_id) == [[ref_ids]]
        rec = coordinator_record(http, qwen_cluster.tandem, request_id)
        assert rec["route"] == "disaggregated", rec
        assert rec["outcome"] == "ok", rec
        assert rec["prompt_tokens"] == len(ref_ids), rec
