"""The OpenAI-compatible server over real HTTP, with the official openai client: chat and completions,
streaming, stop strings, n, seeds, both logprobs formats, echo, errors as the client's exception types,
auth, the bounded queue (429), disconnects freeing KV pages, 32 concurrent streams, /metrics."""

from __future__ import annotations

import asyncio
import json
import math
import socket
import threading
import time

import pytest
import torch

for _dep in ("fastapi", "uvicorn", "prometheus_client", "httpx"):  # the serve extra, and the clients
    pytest.importorskip(_dep)
openai = pytest.importorskip("openai")
import httpx  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from minicpm4.server import create_app  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL = "minicpm4-test"
QUESTION = [{"role": "user", "content": 'What does the word "lantern" mean?'}]
PROMPTS = ['What does the word "lantern" mean?', "Define the word harbor.", "What is a river?",
           'What does "gentle" mean?']
KV_TOKENS = 8192
MAX_BYTES = 256 * 1024


@pytest.fixture(scope="module")
def live(servers):
    llm = servers.engine(kv_cache_tokens=KV_TOKENS, max_num_seqs=64)
    return servers.start(create_app(llm, MODEL, max_request_bytes=MAX_BYTES))


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.base_url, api_key="unused", max_retries=0, timeout=60)


def chat(client, content=QUESTION[0]["content"], **kw):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], **kw)


def wait_idle(llm, timeout=15.0):
    """Until the engine runs nothing and holds no KV page; returns its stats."""
    deadline = time.monotonic() + timeout
    while True:
        s = llm.stats()
        if s.running == 0 and s.waiting == 0 and s.kv_blocks_used == 0:
            return s
        if time.monotonic() > deadline:
            raise AssertionError(f"engine not idle after {timeout} s: {s}")
        time.sleep(0.05)


def test_models_health_and_page(live):
    models = httpx.get(live.base_url + "/models").json()
    assert [m["id"] for m in models["data"]] == [MODEL] and models["data"][0]["max_model_len"] == KV_TOKENS
    assert httpx.get(live.url + "/health").json() == {"status": "ok"}
    page = httpx.get(live.url + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "/v1/chat/completions" in page.text


def test_chat_equals_engine_and_stream_equals_whole(client, pipe):
    from minicpm4.engine import LLM, SamplingParams

    r = chat(client, max_tokens=24)
    text = r.choices[0].message.content
    ids = pipe.tokenizer.encode_chat(QUESTION)
    # the same prompt straight through an engine of our own: the server adds nothing and drops nothing
    ref = LLM(model=pipe.model, tokenizer=pipe.tokenizer, fast_forward=False, kv_cache_tokens=1024)
    expected = ref.generate(ids, SamplingParams(max_new_tokens=24))[0]
    assert text == expected.text and text
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(expected.token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.choices[0].finish_reason == expected.finish_reason and r.object == "chat.completion"

    chunks = list(chat(client, max_tokens=24, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [r.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    # max_completion_tokens is the newer name of max_tokens
    r2 = chat(client, max_completion_tokens=5)
    assert r2.usage.completion_tokens <= 5 and text.startswith(r2.choices[0].message.content)


def test_completions_prompt_forms_and_n(client, pipe):
    one = client.completions.create(model=MODEL, prompt="The river", max_tokens=8)
    assert one.object == "text_completion" and one.choices[0].text and one.usage.completion_tokens <= 8
    ids = pipe.tokenizer.encode("The river")
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=8)
    assert by_ids.choices[0].text == one.choices[0].text and by_ids.usage.prompt_tokens == len(ids)
    many = client.completions.create(model=MODEL, prompt=["The river", "A lantern is"], max_tokens=8, n=2)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.choices[0].text == many.choices[1].text == one.choices[0].text  # greedy: n copies
    assert many.usage.prompt_tokens == len(ids) + len(pipe.tokenizer.encode("A lantern is"))
    lists = client.completions.create(model=MODEL, prompt=[ids, pipe.tokenizer.encode("A lantern is")], max_tokens=8)
    assert [c.text for c in lists.choices] == [many.choices[0].text, many.choices[2].text]


def test_default_completion_budget_is_openai_16(client):
    r = client.completions.create(model=MODEL, prompt="The river", extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 16 and r.choices[0].finish_reason == "length"


def test_stop_strings(client):
    full = chat(client, max_tokens=32, extra_body={"ignore_eos": True}).choices[0].message.content
    words = full.split()
    stop = " " + words[len(words) // 2]
    cut = full.index(stop)
    r = chat(client, max_tokens=32, stop=stop, extra_body={"ignore_eos": True})
    assert r.choices[0].message.content == full[:cut] and r.choices[0].finish_reason == "stop"
    r = chat(client, max_tokens=32, stop=["\u2603 never", stop], extra_body={"ignore_eos": True})
    assert r.choices[0].message.content == full[:cut]
    streamed = chat(client, max_tokens=32, stop=[stop], stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == full[:cut]


def test_n_choices_use_seed_plus_i(client):
    kw = dict(max_tokens=12, temperature=1.0, top_p=0.95, extra_body={"ignore_eos": True})
    r = chat(client, n=3, seed=7, **kw)
    texts = [c.message.content for c in r.choices]
    assert [c.index for c in r.choices] == [0, 1, 2] and len(set(texts)) > 1
    assert [c.message.content for c in chat(client, n=3, seed=7, **kw).choices] == texts  # seeded: repeatable
    assert [chat(client, seed=7 + i, **kw).choices[0].message.content for i in range(3)] == texts
    assert r.usage.completion_tokens == 36
    assert len(chat(client, n=2, **kw).choices) == 2  # unseeded works too


def test_chat_logprobs(client):
    r = chat(client, max_tokens=10, logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 10
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        tops = [x.logprob for x in t.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and t.logprob <= 0
        assert t.top_logprobs[0].token == t.token and math.isclose(tops[0], t.logprob, abs_tol=1e-5)  # greedy
        assert bytes(t.bytes).decode() == t.token
    streamed = chat(client, max_tokens=10, logprobs=True, top_logprobs=3, stream=True, extra_body={"ignore_eos": True})
    tokens = [t for c in streamed if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [(t.token, round(t.logprob, 4)) for t in tokens] == [(t.token, round(t.logprob, 4)) for t in content]
    assert chat(client, max_tokens=3, logprobs=True).choices[0].logprobs.content[0].top_logprobs == []


def test_completion_echo_prompt_logprobs_match_the_model(client, pipe):
    prompt = "A lantern is a light"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    choice = r.choices[0]
    ids = pipe.tokenizer.encode(prompt)
    lp = choice.logprobs
    assert choice.text == prompt and choice.finish_reason == "length" and r.usage.completion_tokens == 0
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == len(ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    with torch.no_grad():
        expected = torch.log_softmax(pipe.model(torch.tensor([ids]))[0].float(), -1)
    for i in range(1, len(ids)):
        assert math.isclose(lp.token_logprobs[i], float(expected[i - 1, ids[i]]), abs_tol=1e-3)
        best = int(expected[i - 1].argmax())
        assert math.isclose(max(lp.top_logprobs[i].values()), float(expected[i - 1, best]), abs_tol=1e-3)
    assert lp.text_offset == sorted(lp.text_offset) and "".join(lp.tokens[1:]) == prompt  # tokens[0] is BOS


def test_completion_lm_eval_loglikelihood_request(client, pipe):
    """What lm-evaluation-harness local-completions sends for loglikelihood: token-id prompts, max_tokens 1."""
    context, continuation = pipe.tokenizer.encode("A lantern is"), pipe.tokenizer.encode(" a light", add_bos=False)
    prompts = [context + continuation, context + pipe.tokenizer.encode(" a river", add_bos=False)]
    r = client.completions.create(model=MODEL, prompt=prompts, max_tokens=1, echo=True, logprobs=1, temperature=0,
                                  seed=1234)
    for choice, ids in zip(sorted(r.choices, key=lambda c: c.index), prompts):
        lp = choice.logprobs
        assert len(lp.token_logprobs) == len(ids) + 1  # the prompt, then the generated token
        part = lp.token_logprobs[len(context):-1]  # lm-eval's slice: the continuation
        tops = lp.top_logprobs[len(context):-1]
        assert len(part) == len(ids) - len(context) and all(x <= 0 for x in part)
        assert all(len(t) in (1, 2) for t in tops)  # top-1, plus the actual token when it is not the top
        with torch.no_grad():
            argmax = pipe.model(torch.tensor([ids]))[0].argmax(-1).tolist()
        # lm-eval's is_greedy test per token agrees with the model's own argmax
        greedy = [tok == max(top.values()) for tok, top in zip(part, tops)]
        assert greedy == [argmax[i - 1] == ids[i] for i in range(len(context), len(ids))]


def test_completion_generated_logprobs_and_stream(client, pipe):
    kw = dict(model=MODEL, prompt="The river", max_tokens=6, logprobs=2, extra_body={"ignore_eos": True})
    r = client.completions.create(**kw)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 6 and "".join(lp.tokens) == r.choices[0].text and lp.text_offset[0] == 0
    assert all(len(t) >= 2 for t in lp.top_logprobs)
    pieces = list(client.completions.create(stream=True, echo=True, **kw))
    assert "".join(p.choices[0].text for p in pieces if p.choices) == "The river" + r.choices[0].text
    streamed = [x for p in pieces if p.choices and p.choices[0].logprobs for x in p.choices[0].logprobs.token_logprobs]
    assert streamed[0] is None and len(streamed) == len(pipe.tokenizer.encode("The river")) + 6


def test_bad_requests_are_400_with_openai_errors(client, live):
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, temperature=5)
    assert e.value.body["param"] == "temperature" and "less than or equal to 2" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, content="lantern " * (KV_TOKENS + 100), max_tokens=4)
    message = e.value.body["message"]
    assert f"maximum context length is {KV_TOKENS} tokens" in message and "messages have" in message
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, max_tokens=KV_TOKENS)
    assert "you requested" in e.value.body["message"] and e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError):
        chat(client, top_logprobs=2)  # without logprobs=True
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt=[10**9], max_tokens=2)
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4", messages=QUESTION)
    assert MODEL in e.value.body["message"]

    url = live.base_url + "/chat/completions"
    bodies = ["not json", "[]", "{}", '{"messages": []}', '{"messages": [{"role": "robot", "content": "x"}]}',
              '{"messages": [{"role": "user", "content": "x"}], "max_tokens": true}',
              '{"messages": [{"role": "user", "content": "x"}], "stop": [""]}',
              '{"messages": [{"role": "user", "content": "x"}], "n": 0}',
              '{"messages": [{"role": "user", "content": "x"}], "seed": 1e400}']
    for body in bodies:
        res = httpx.post(url, content=body, headers={"content-type": "application/json"})
        assert res.status_code == 400, (body, res.text)
        assert set(res.json()["error"]) == {"message", "type", "param", "code"}, res.text
    assert httpx.get(live.url + "/v1/nothing").status_code == 404
    assert httpx.get(url).status_code == 405 and "error" in httpx.get(url).json()


def test_request_size_limit_is_413(live):
    url = live.base_url + "/completions"
    big = json.dumps({"prompt": "x" * MAX_BYTES, "max_tokens": 1})
    res = httpx.post(url, content=big, headers={"content-type": "application/json"})
    assert res.status_code == 413 and "at most" in res.json()["error"]["message"]

    def chunked():  # no Content-Length: counted as it arrives
        for i in range(0, len(big), 65536):
            yield big[i:i + 65536].encode()

    res = httpx.post(url, content=chunked(), headers={"content-type": "application/json"})
    assert res.status_code == 413 and res.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(live.url + "/health").status_code == 200


def test_generation_config_defaults_fill_omitted_fields(servers, live):
    sampled = servers.start(create_app(live.llm, MODEL, defaults={"temperature": 1.0, "top_p": 0.9},
                                       shutdown_engine=False))
    c = openai.OpenAI(base_url=sampled.base_url, api_key="x", max_retries=0)
    kw = dict(max_tokens=12, seed=3, extra_body={"ignore_eos": True})
    implicit = chat(c, **kw).choices[0].message.content
    assert implicit == chat(c, temperature=1.0, top_p=0.9, **kw).choices[0].message.content
    assert implicit != chat(c, temperature=0, **kw).choices[0].message.content  # an explicit value wins


def test_api_key(servers, live):
    keyed = servers.start(create_app(live.llm, MODEL, api_key="s3cret", shutdown_engine=False))
    wrong = openai.OpenAI(base_url=keyed.base_url, api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        wrong.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=2)
    assert e.value.body["code"] == "invalid_api_key"
    assert httpx.get(keyed.base_url + "/models").status_code == 401
    right = openai.OpenAI(base_url=keyed.base_url, api_key="s3cret", max_retries=0)
    assert right.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=2).choices[0].message.content
    assert httpx.get(keyed.url + "/health").status_code == 200  # probes need no key


def raw_post(url: str, path: str, body: dict) -> socket.socket:
    """Send a POST on a plain socket and return it unread (close it to disconnect)."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])))
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def wait_for(predicate, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_full_queue_answers_429_not_a_hang(servers):
    llm = servers.engine(max_num_seqs=1, max_waiting=1)
    small = servers.start(create_app(llm, MODEL))
    c = openai.OpenAI(base_url=small.base_url, api_key="x", max_retries=0, timeout=30)
    long = chat(c, max_tokens=3000, stream=True, extra_body={"ignore_eos": True})
    next(iter(long))  # running: it holds the only slot
    queued = raw_post(small.url, "/v1/chat/completions", {"messages": QUESTION, "max_tokens": 2})
    wait_for(lambda: llm.stats().waiting == 1, "the second request never queued")
    start = time.monotonic()
    with pytest.raises(openai.RateLimitError) as e:
        chat(c, max_tokens=2)
    assert time.monotonic() - start < 5 and "waiting queue is full" in e.value.body["message"]
    assert e.value.body["code"] == "rate_limit_exceeded"
    queued.close()  # a client that leaves while queued gives its queue slot back
    wait_for(lambda: llm.stats().waiting == 0, "the abandoned queued request kept its slot")
    replies: list = []
    t = threading.Thread(target=lambda: replies.append(chat(c, max_tokens=2)))
    t.start()
    wait_for(lambda: llm.stats().waiting == 1, "the third request never queued")
    long.close()  # frees the running slot: the queued request runs
    t.join(timeout=20)
    assert replies and replies[0].choices[0].finish_reason in ("stop", "length")
    wait_idle(llm)


def test_stream_disconnect_aborts_and_frees_kv_blocks(live):
    wait_idle(live.llm)
    body = {"messages": QUESTION, "max_tokens": 4000, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", live.base_url + "/chat/completions", json=body, timeout=30) as res:
        lines = res.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert got[0].startswith("data: ") and live.llm.stats().kv_blocks_used > 0
    # the client left mid-stream: its request must be aborted and its pages freed, long before 4000 tokens
    stats = wait_idle(live.llm, timeout=10)
    assert stats.generated_tokens_total > 0
    metrics = httpx.get(live.url + "/metrics").text
    assert "minicpm4_kv_blocks_used 0.0" in metrics and "minicpm4_requests_running 0.0" in metrics


def test_non_streamed_disconnect_aborts_too(live):
    wait_idle(live.llm)
    sock = raw_post(live.url, "/v1/chat/completions", {"messages": QUESTION, "max_tokens": 4000, "ignore_eos": True})
    wait_for(lambda: live.llm.stats().running == 1, "the request never ran")
    sock.close()
    wait_idle(live.llm, timeout=10)


def test_echo_logprobs_after_a_prefix_cache_hit(client):
    prompt = "The word lantern means a light that one carries. " * 12  # > 64 tokens: full, reusable KV pages
    first = client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    again = client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    assert again.choices[0].logprobs.token_logprobs == first.choices[0].logprobs.token_logprobs


def test_32_concurrent_streams_equal_single_greedy_requests(live, client):
    references = {p: chat(client, content=p, max_tokens=16).choices[0].message.content for p in PROMPTS}
    steps_before = live.llm.stats().steps_total

    async def one(aclient, prompt):
        stream = await aclient.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                                       max_tokens=16, stream=True)
        parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        return prompt, "".join(parts)

    async def main():
        async with openai.AsyncOpenAI(base_url=live.base_url, api_key="x", max_retries=0, timeout=60) as aclient:
            return await asyncio.gather(*(one(aclient, PROMPTS[i % len(PROMPTS)]) for i in range(32)))

    results = asyncio.run(main())
    assert len(results) == 32 and all(text == references[prompt] for prompt, text in results)
    # they were batched: far fewer engine steps than the 32 x 16 tokens one at a time would take
    steps = live.llm.stats().steps_total - steps_before
    assert steps < 32 * 16 / 2
    wait_idle(live.llm)


def test_metrics_names_and_counts(live, client):
    chat(client, max_tokens=4)
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(live.url + "/metrics").text)}
    for name in ("minicpm4_requests_running", "minicpm4_requests_waiting", "minicpm4_kv_blocks_used",
                 "minicpm4_kv_blocks_total", "minicpm4_prompt_tokens", "minicpm4_generation_tokens",
                 "minicpm4_time_to_first_token_seconds", "minicpm4_generation_tokens_per_second",
                 "minicpm4_requests_finished", "minicpm4_http_errors"):
        assert name in families, name

    def value(name, suffix=""):
        return next(s.value for s in families[name].samples if s.name == name + suffix)

    assert value("minicpm4_kv_blocks_total") == KV_TOKENS // 64
    assert value("minicpm4_generation_tokens", "_total") > 0 and value("minicpm4_prompt_tokens", "_total") > 0
    assert value("minicpm4_time_to_first_token_seconds", "_count") > 0
