"""The official OpenAI Python client through `tandem serve` whose pools are called over vLLM's
native gRPC (`vllm.Inference`): Tandem renders the engine's token stream into the same OpenAI
bytes the engine's own HTTP server writes, and relays the prefill's KV handoff."""

from __future__ import annotations

import httpx
import openai
import pytest

from test_openai_client import admin_record, check_usage

MAX_TOKENS = 16
PROMPT = "Explain prefill/decode disaggregation in one sentence."


@pytest.fixture(scope="module")
def client(grpc_cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{grpc_cluster.tandem}/v1", api_key="unused", max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def http_engine(grpc_cluster) -> openai.OpenAI:
    """The decode engine's own HTTP server (the same engine Tandem calls over gRPC)."""
    return openai.OpenAI(base_url=f"{grpc_cluster.decode}/v1", api_key="unused", max_retries=0, timeout=30)


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and line[len(name)] in "{ "
    )


def test_streams_chat_over_grpc_pools_and_equals_the_engines_http_answer(grpc_cluster, client, http_engine):
    pulls_before = metric(grpc_cluster.decode, "vllm:nixl_xfer_time_seconds_count")
    kw = dict(
        model=grpc_cluster.model,
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=MAX_TOKENS,
        seed=3,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(client.chat.completions.create(**kw))
    ids = {c.id for c in chunks}
    assert len(ids) == 1 and next(iter(ids)).startswith("chatcmpl-"), ids
    first = [c for c in chunks if c.choices][0].choices[0].delta
    assert first.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    text = "".join(pieces)
    usage = chunks[-1].usage
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"]
    check_usage(usage, finish[0], len(pieces))
    want = list(http_engine.chat.completions.create(**kw))
    assert text == "".join(c.choices[0].delta.content or "" for c in want if c.choices)
    assert usage.prompt_tokens == want[-1].usage.prompt_tokens
    rec = admin_record(grpc_cluster, chunks[0].id, "chatcmpl-")
    assert rec["route"] == "disaggregated", rec
    assert rec["outcome"] == "ok", rec
    # The decode engine pulled the prefill's KV (the params were relayed, not dropped).
    assert metric(grpc_cluster.decode, "vllm:nixl_xfer_time_seconds_count") == pulls_before + 1


def test_completion_over_grpc_pools(grpc_cluster, client, http_engine):
    kw = dict(model=grpc_cluster.model, prompt="The quick brown fox", max_tokens=MAX_TOKENS, seed=5)
    resp = client.completions.create(**kw)
    assert resp.object == "text_completion" and resp.id.startswith("cmpl-")
    want = http_engine.completions.create(**kw)
    assert resp.choices[0].text == want.choices[0].text
    assert resp.choices[0].finish_reason == want.choices[0].finish_reason
    assert resp.usage.completion_tokens == want.usage.completion_tokens
    rec = admin_record(grpc_cluster, resp.id, "cmpl-")
    assert rec["route"] == "disaggregated", rec


def test_fields_grpc_cannot_carry_are_refused_by_name(grpc_cluster, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=grpc_cluster.model, prompt="x", max_tokens=4, logprobs=2)
    assert "logprobs" in str(e.value)
    assert "gRPC" in str(e.value)


def test_models_list_over_grpc(grpc_cluster, client):
    assert [m.id for m in client.models.list().data] == [grpc_cluster.model]
