"""The official OpenAI Python client against `tandem serve` (disaggregation mode "always")."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

MAX_TOKENS = 16


@pytest.fixture(scope="module")
def client(cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{cluster.tandem}/v1", api_key="unused", max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def decode_client(cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{cluster.decode}/v1", api_key="unused", max_retries=0, timeout=30)


def stream_chat(client: openai.OpenAI, model: str, prompt: str) -> dict:
    """Streams one chat completion; returns what the stream carried."""
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=MAX_TOKENS,
        stream=True,
        stream_options={"include_usage": True},
    )
    ids, pieces, finish, usage = set(), [], None, None
    chunks = 0
    for chunk in stream:
        chunks += 1
        assert chunk.object == "chat.completion.chunk"
        ids.add(chunk.id)
        for choice in chunk.choices:
            assert choice.index == 0
            if choice.delta is not None and choice.delta.content:
                pieces.append(choice.delta.content)
            if choice.finish_reason is not None:
                assert finish is None, "finish_reason sent twice"
                finish = choice.finish_reason
        if chunk.usage is not None:
            assert usage is None, "usage sent twice"
            assert chunk.choices == [], "the usage chunk carries no choices"
            usage = chunk.usage
    return {"ids": ids, "pieces": pieces, "finish": finish, "usage": usage, "chunks": chunks}


def check_usage(usage, finish: str | None, content_tokens: int) -> None:
    assert usage is not None, "no usage (stream_options.include_usage / non-streaming usage)"
    assert usage.prompt_tokens > 0
    assert finish in ("length", "stop"), finish
    if finish == "length":
        assert usage.completion_tokens == MAX_TOKENS
    else:
        # Stopped early: every generated token (but EOS) is content.
        assert 0 < usage.completion_tokens <= MAX_TOKENS
        assert content_tokens <= usage.completion_tokens
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def admin_record(cluster, response_id: str, prefix: str) -> dict:
    """The coordinator's record of a request, polled until it is written (bounded)."""
    assert response_id.startswith(prefix), response_id
    want = {response_id, response_id[len(prefix):]}
    deadline = time.monotonic() + 10.0
    seen: list = []
    with httpx.Client(timeout=5.0) as http:
        while time.monotonic() < deadline:
            r = http.get(f"{cluster.tandem}/admin/requests")
            assert r.status_code == 200, r.text
            seen = r.json()
            assert isinstance(seen, list)
            for rec in seen:
                if rec.get("request_id") in want and rec.get("outcome") is not None:
                    return rec
            time.sleep(0.05)
    raise AssertionError(f"no /admin/requests record for {response_id}; have {[r.get('request_id') for r in seen]}")


def test_streams_chat_completion_through_tandem(cluster, client):
    got = stream_chat(client, cluster.model, "Explain prefill/decode disaggregation in one sentence.")

    assert got["chunks"] > 2
    assert len(got["ids"]) == 1, f"chunks carry different ids: {got['ids']}"
    (rid,) = got["ids"]
    assert rid.startswith("chatcmpl-"), rid
    assert got["pieces"], "no chunk carried delta.content"
    text = "".join(got["pieces"])
    assert text, "joined content is empty"
    check_usage(got["usage"], got["finish"], len(got["pieces"]))

    rec = admin_record(cluster, rid, "chatcmpl-")
    assert rec["route"] == "disaggregated", rec
    assert rec["outcome"] == "ok", rec
    assert rec["content_chunks"] == len(got["pieces"]), rec
    assert rec["prompt_tokens"] == got["usage"].prompt_tokens, rec
    assert rec["ttft_s"] is not None and rec["ttft_s"] > 0, rec
    assert rec["prefill_s"] is not None and rec["prefill_s"] > 0, rec


def test_completion_non_streaming_through_tandem(cluster, client):
    resp = client.completions.create(
        model=cluster.model,
        prompt="The quick brown fox",
        max_tokens=MAX_TOKENS,
    )
    assert resp.object == "text_completion"
    assert resp.id.startswith("cmpl-"), resp.id
    assert resp.model == cluster.model
    assert len(resp.choices) == 1
    choice = resp.choices[0]
    assert choice.text, "empty completion text"
    check_usage(resp.usage, choice.finish_reason, 0)

    rec = admin_record(cluster, resp.id, "cmpl-")
    assert rec["route"] == "disaggregated", rec
    assert rec["outcome"] == "ok", rec
    assert rec["prompt_tokens"] == resp.usage.prompt_tokens, rec


def test_tandem_and_decode_engine_agree(cluster, client, decode_client):
    """Same seed, same prompt: P/D through tandem yields what the decode engine alone yields."""
    prompt = "Name three prime numbers."
    via_tandem = stream_chat(client, cluster.model, prompt)
    direct = stream_chat(decode_client, cluster.model, prompt)

    assert via_tandem["pieces"], "no content through tandem"
    assert "".join(via_tandem["pieces"]) == "".join(direct["pieces"])
    assert via_tandem["finish"] == direct["finish"]
    assert via_tandem["usage"].prompt_tokens == direct["usage"].prompt_tokens
    assert via_tandem["usage"].completion_tokens == direct["usage"].completion_tokens
    # Two separate requests, two ids.
    assert via_tandem["ids"] != direct["ids"]


def test_models_list(cluster, client):
    ids = [m.id for m in client.models.list()]
    assert cluster.model in ids, ids
