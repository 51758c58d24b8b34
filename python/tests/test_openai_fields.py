"""The official OpenAI Python client through `tandem serve` (disaggregated) over sims that run
Qwen3's real tokenizer and chat template: logprobs, tool calls, JSON output, prompt lists and the
stream's role chunk come back in vLLM's shapes, and equal what the decode engine answers
directly (its sampling is a function of seed, prompt and position)."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from test_openai_client import admin_record

MAX_TOKENS = 12
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer"},
            },
            "required": ["city", "unit"],
        },
    },
}
MESSAGES = [{"role": "user", "content": "What is the weather in Zürich?"}]


@pytest.fixture(scope="module")
def tandem(qwen_cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{qwen_cluster.tandem}/v1", api_key="unused", max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def direct(qwen_cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{qwen_cluster.decode}/v1", api_key="unused", max_retries=0, timeout=30)


def disaggregated(cluster, response_id: str, prefix: str) -> None:
    rec = admin_record(cluster, response_id, prefix)
    assert rec["route"] == "disaggregated", rec
    assert rec["outcome"] == "ok", rec


def test_stream_role_chunk_comes_with_the_first_token_and_text_retokenizes(qwen_cluster, tandem):
    stream = tandem.chat.completions.create(
        model=qwen_cluster.model,
        messages=MESSAGES,
        max_tokens=MAX_TOKENS,
        seed=3,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c for c in stream]
    with_choices = [c for c in chunks if c.choices]
    # vLLM's role chunk (`content: ""`) goes out in the same iteration as the first output, right
    # before the chunk that carries it.
    first = with_choices[0].choices[0].delta
    assert first.role == "assistant" and first.content == "", first
    assert with_choices[1].choices[0].delta.content, with_choices[1]
    assert all(c.choices[0].delta.role is None for c in with_choices[1:])
    text = "".join(c.choices[0].delta.content or "" for c in with_choices)
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == MAX_TOKENS
    # The sampled words re-tokenize to the count the engine reported (benchmark clients check).
    r = httpx.post(
        f"{qwen_cluster.tandem}/tokenize",
        json={"model": qwen_cluster.model, "prompt": text, "add_special_tokens": False},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    assert r.json()["count"] == usage.completion_tokens, (text, r.json())
    disaggregated(qwen_cluster, chunks[0].id, "chatcmpl-")


def test_chat_logprobs_in_vllms_shape(qwen_cluster, tandem, direct):
    kw = dict(model=qwen_cluster.model, messages=MESSAGES, max_tokens=MAX_TOKENS, seed=5, logprobs=True, top_logprobs=3)
    resp = tandem.chat.completions.create(**kw)
    lp = resp.choices[0].logprobs
    assert lp is not None and lp.content is not None
    assert len(lp.content) == resp.usage.completion_tokens
    text = ""
    for tok in lp.content:
        assert tok.logprob <= 0.0
        assert len(tok.top_logprobs) == 3
        values = [t.logprob for t in tok.top_logprobs]
        assert values == sorted(values, reverse=True)
        # The sampled token is in the top list with the same logprob.
        assert any(t.token == tok.token and t.logprob == tok.logprob for t in tok.top_logprobs), tok
        assert tok.bytes == list(tok.token.encode("utf-8"))
        text += tok.token
    assert text == resp.choices[0].message.content
    same = direct.chat.completions.create(**kw)
    assert same.choices[0].logprobs.model_dump() == lp.model_dump()
    disaggregated(qwen_cluster, resp.id, "chatcmpl-")


def test_completion_logprobs_and_echo(qwen_cluster, tandem, direct):
    prompt = "Prefill and decode"
    kw = dict(model=qwen_cluster.model, prompt=prompt, max_tokens=MAX_TOKENS, seed=9, logprobs=2)
    resp = tandem.completions.create(**kw)
    lp = resp.choices[0].logprobs
    n = resp.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert "".join(lp.tokens) == resp.choices[0].text
    for tok, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 2 and top.get(tok) == value
    assert direct.completions.create(**kw).choices[0].model_dump() == resp.choices[0].model_dump()
    echoed = tandem.completions.create(**kw, echo=True)
    assert echoed.choices[0].text == prompt + resp.choices[0].text
    assert echoed.choices[0].logprobs.token_logprobs[0] is None, "the first prompt token has no logprob"


@pytest.mark.parametrize("stream", [False, True])
def test_tool_calls_in_vllms_shape(qwen_cluster, tandem, direct, stream):
    kw = dict(model=qwen_cluster.model, messages=MESSAGES, tools=[WEATHER], tool_choice="required", max_tokens=200, seed=2)
    if not stream:
        resp = tandem.chat.completions.create(**kw)
        choice = resp.choices[0]
        assert choice.finish_reason == "tool_calls"
        (call,) = choice.message.tool_calls
        name, arguments, call_id = call.function.name, call.function.arguments, call.id
        assert call.type == "function"
        want = direct.chat.completions.create(**kw).choices[0].message.tool_calls[0]
        assert (want.function.name, want.function.arguments) == (name, arguments)
        rid = resp.id
    else:
        chunks = list(tandem.chat.completions.create(**kw, stream=True))
        name, arguments, call_id, finish = None, "", None, None
        for c in chunks:
            for ch in c.choices:
                for tc in ch.delta.tool_calls or []:
                    assert tc.index == 0
                    call_id = tc.id or call_id
                    if tc.function and tc.function.name:
                        name = tc.function.name
                    if tc.function and tc.function.arguments:
                        arguments += tc.function.arguments
                finish = ch.finish_reason or finish
        assert finish == "tool_calls"
        rid = chunks[0].id
    assert name == "get_weather"
    assert call_id and call_id.startswith("chatcmpl-tool-"), call_id
    args = json.loads(arguments)
    assert isinstance(args["city"], str)
    assert args["unit"] in ("celsius", "fahrenheit")
    assert isinstance(args.get("days", 0), int)
    disaggregated(qwen_cluster, rid, "chatcmpl-")


def test_named_tool_choice_and_unknown_tool(qwen_cluster, tandem):
    named = {"type": "function", "function": {"name": "get_weather"}}
    resp = tandem.chat.completions.create(
        model=qwen_cluster.model, messages=MESSAGES, tools=[WEATHER], tool_choice=named, max_tokens=200, seed=4
    )
    (call,) = resp.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    json.loads(call.function.arguments)
    with pytest.raises(openai.BadRequestError):
        tandem.chat.completions.create(
            model=qwen_cluster.model,
            messages=MESSAGES,
            tools=[WEATHER],
            tool_choice={"type": "function", "function": {"name": "nope"}},
            max_tokens=20,
        )


def test_json_schema_output_parses_to_the_schema(qwen_cluster, tandem, direct):
    schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "temperature": {"type": "number"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "sunny": {"type": "boolean"},
        },
        "required": ["city", "temperature", "tags", "sunny"],
    }
    kw = dict(
        model=qwen_cluster.model,
        messages=MESSAGES,
        max_tokens=300,
        seed=6,
        response_format={"type": "json_schema", "json_schema": {"name": "weather", "schema": schema}},
    )
    resp = tandem.chat.completions.create(**kw)
    assert resp.choices[0].finish_reason == "stop"
    out = json.loads(resp.choices[0].message.content)
    assert isinstance(out["city"], str)
    assert isinstance(out["temperature"], (int, float))
    assert all(isinstance(t, str) for t in out["tags"])
    assert isinstance(out["sunny"], bool)
    assert direct.chat.completions.create(**kw).choices[0].message.content == resp.choices[0].message.content
    obj = tandem.chat.completions.create(
        model=qwen_cluster.model, messages=MESSAGES, max_tokens=300, seed=6, response_format={"type": "json_object"}
    )
    assert isinstance(json.loads(obj.choices[0].message.content), dict)
    disaggregated(qwen_cluster, resp.id, "chatcmpl-")


def test_prompt_list_is_disaggregated_and_equals_the_engine(qwen_cluster, tandem, direct):
    kw = dict(model=qwen_cluster.model, prompt=["First prompt.", "Second, longer prompt here."], max_tokens=8, seed=1)
    resp = tandem.completions.create(**kw)
    want = direct.completions.create(**kw)
    assert [(c.index, c.text) for c in resp.choices] == [(c.index, c.text) for c in want.choices]
    assert resp.usage.prompt_tokens == want.usage.prompt_tokens
    assert resp.usage.completion_tokens == want.usage.completion_tokens
    for i in range(2):
        disaggregated(qwen_cluster, f"{resp.id}-{i}", "cmpl-")
