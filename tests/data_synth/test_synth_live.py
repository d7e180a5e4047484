"""Every synthesis track end to end against our server on the bundled default model (real HTTP, EndpointBackend,
tools= for the tool track, the sandbox for code): each writes schema-valid records whose rejection reasons come
from the verifiers. The ~3M-parameter model mostly fails the verifiers; that is expected and fine here."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from minicpm4.data.synth.records import TRACKS, validate_record

LIVE_REASONS = re.compile("|".join([
    r"reply not in the Question/Answer format", r"empty (reply|answer|query|rewritten question)",
    r"question not about", r"rewritten question not about", r"(answer|query|reply|rewritten question) "
    r"(echoes the prompt|too short|too long)", r"refusal in the", r"second answer repeats", r"multiple-choice question",
    r"fill-in-the-blank question", r"no final answer", r"wrong answer", r"final answer too long",
    r"rephrased problem", r"no code block", r"tests failed", r"no final 'Answer' line", r"wrong output",
    r"no mutation", r"no usable sample", r"\d+/\d+ samples pass", r"query not about", r"answer not grounded",
    r"context length", r"document \d+ of the context", r"gold tool", r"no tool call", r"unknown tool", r"schema: ",
    r"call \d+: ", r"call without a tool name", r"arguments are", r"near duplicate of ",
]))


@pytest.fixture(scope="module")
def live():
    pytest.importorskip("uvicorn")
    pytest.importorskip("fastapi")
    from minicpm4.server import create_app

    root = str(Path(__file__).resolve().parents[2])
    if root not in sys.path:  # `python -m pytest` puts the repo root on sys.path, `.venv/bin/pytest` does not
        sys.path.insert(0, root)
    from tests.server.conftest import make_engine, serve

    server = serve(create_app(make_engine(), "minicpm4-default", shutdown_engine=True))
    yield server
    server.stop()


def test_every_track_against_the_live_server(live, tmp_path):
    from minicpm4.apps.chat_backend import EndpointBackend, Sampling
    from minicpm4.data.synth.cli import TrackOptions, build_tracks
    from minicpm4.data.synth.runner import RunConfig, run_synthesis
    from minicpm4.data.synth.track import TrackContext
    from minicpm4.train.rl.sandbox import SandboxUnavailable, check_sandbox

    try:
        check_sandbox()
        code = True
    except SandboxUnavailable:
        code = False
    backend = EndpointBackend(live.base_url, concurrency=8)
    ctx = TrackContext(samples=2)
    tracks = build_tracks(list(TRACKS), ctx, TrackOptions(code=code, length_range=(256, 768), max_constraints=2))
    out = tmp_path / "live.jsonl"
    stats = run_synthesis(tracks, backend, Sampling(max_tokens=24, temperature=0.7, top_p=0.95, seed=0),
                          RunConfig(out=out, limit=2, concurrency=8, show_progress=False, review_fraction=0.5,
                                    kept_only=tmp_path / "kept.jsonl"))
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert stats["completed"] and len(records) == stats["records"]
    for r in records:
        validate_record(r)
        if not r["kept"]:
            assert LIVE_REASONS.match(r["reason"]), r["reason"]
    by_track = {t: [r for r in records if r["track"] == t] for t in TRACKS}
    assert all(by_track[t] for t in TRACKS), {t: len(v) for t, v in by_track.items()}
    assert len({r["id"] for r in records}) == len(records)
    assert stats["tracks"]["longctx"]["info"]["length_unit"] == "chars/4 estimate"
    assert all(t["generated"] == len(by_track[name]) for name, t in stats["tracks"].items())
