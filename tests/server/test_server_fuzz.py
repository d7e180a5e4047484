"""Property-based fuzzing of both completion endpoints from the server's own OpenAPI schema
(schemathesis strategies: bodies that follow the schema and bodies that break it): no answer is a 5xx,
every error has the OpenAI shape, and the server still serves afterwards. Bounded: a 64-token context
(every valid body finishes quickly) and a fixed number of examples."""

from __future__ import annotations

import pytest

for _dep in ("fastapi", "uvicorn", "prometheus_client", "httpx"):  # the serve extra, and the client
    pytest.importorskip(_dep)
import httpx  # noqa: E402

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from minicpm4.server import create_app  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
EXAMPLES = 100  # over both endpoints, schema-following and schema-breaking bodies


@pytest.fixture(scope="module")
def fuzzed(servers):
    llm = servers.engine(kv_cache_tokens=2048, max_model_len=64, max_waiting=64)
    return servers.start(create_app(llm, "minicpm4-fuzz"))


def test_fuzzed_bodies_never_get_a_5xx(fuzzed):
    # schemathesis' pytest plugin (from_fixture) does not run under pytest 9; its strategies do, with hypothesis
    schema = schemathesis.openapi.from_url(fuzzed.url + "/openapi.json")
    ops = [r.ok() for r in schema.get_all_operations()]
    posts = [op for op in ops if op.method.upper() == "POST"]
    assert {op.path for op in posts} == {"/v1/chat/completions", "/v1/completions"}
    modes = (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)
    cases = st.one_of([op.as_strategy(generation_mode=mode) for op in posts for mode in modes])
    seen: dict[int, int] = {}

    @given(case=cases)
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def check(case):
        response = case.call(base_url=fuzzed.url, timeout=30)
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        assert response.status_code < 500, (case.body, response.status_code, response.text[:500])
        if response.status_code >= 400:
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}, response.text

    check()
    assert seen.get(200, 0) > 0 and seen.get(400, 0) > 0, seen  # both kinds of body were exercised

    assert httpx.get(fuzzed.url + "/health").json() == {"status": "ok"}
    r = httpx.post(fuzzed.url + "/v1/completions", json={"prompt": "The river", "max_tokens": 3})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
    s = fuzzed.llm.stats()
    assert s.running == 0 and s.kv_blocks_used == 0
