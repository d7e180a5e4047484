"""The server with speculative decoding on: concurrent streams never crash or corrupt each other (CPM.cu's tree
drafter crashed under concurrent requests, MINICPM4.md §4.8) and give plain greedy decoding's text."""

from __future__ import annotations

import asyncio

import pytest

for _dep in ("fastapi", "uvicorn", "prometheus_client", "httpx"):
    pytest.importorskip(_dep)
openai = pytest.importorskip("openai")
import httpx  # noqa: E402

from minicpm4.server import create_app  # noqa: E402
from minicpm4.speculative.config import SpeculativeConfig  # noqa: E402
from minicpm4.speculative.draft_model import build_draft, save_draft  # noqa: E402
from minicpm4.speculative.tree import TreeShape  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL = "minicpm4-spec"
PROMPTS = ['What does the word "lantern" mean?', "Define the word harbor.", "What is a river?",
           'What does "gentle" mean?', "Give me a synonym of \"quick\"."]


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory):
    from tests.server.conftest import load_pipe

    folder = tmp_path_factory.mktemp("draft")
    return save_draft(build_draft(load_pipe().model.config, seed=2), folder)


def _texts(live, n: int) -> list[tuple[str, str]]:
    async def one(aclient, prompt):
        stream = await aclient.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                                       max_tokens=20, stream=True)
        parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        return prompt, "".join(parts)

    async def main():
        async with openai.AsyncOpenAI(base_url=live.base_url, api_key="x", max_retries=0, timeout=120) as aclient:
            return await asyncio.gather(*(one(aclient, PROMPTS[i % len(PROMPTS)]) for i in range(n)))

    return asyncio.run(main())


def test_concurrent_speculative_streams_equal_plain_greedy(servers, draft_dir):
    plain = servers.start(create_app(servers.engine(max_num_seqs=32), MODEL))
    references = dict(_texts(plain, len(PROMPTS)))
    spec = SpeculativeConfig(str(draft_dir), shape=TreeShape(3, 3, 8))
    live = servers.start(create_app(servers.engine(max_num_seqs=32, speculative=spec, spec_max_seqs=8), MODEL))
    results = _texts(live, 24)
    assert len(results) == 24 and all(text == references[prompt] for prompt, text in results)
    metrics = httpx.get(live.url + "/metrics").text
    verified = [line for line in metrics.splitlines() if line.startswith("minicpm4_spec_verifications_total")]
    assert verified and float(verified[0].split()[-1]) > 0
