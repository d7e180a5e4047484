"""`minicpm4 serve` as a user runs it: --help, and SIGTERM lets a running stream finish (drain) before exit."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from minicpm4.cli import main


def test_serve_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["serve", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "usage: minicpm4 serve" in out
    for flag in ("--host", "--port", "--api-key", "--max-waiting", "--kv-cache-tokens", "--max-num-seqs", "--threads",
                 "--dtype", "--model"):
        assert flag in out


def test_serve_rejects_bad_flags(capsys):
    assert main(["serve", "--port", "0"]) == 2 and "--port 0" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_drains_running_streams(tmp_path):
    for dep in ("fastapi", "uvicorn", "prometheus_client"):  # the serve extra
        pytest.importorskip(dep)
    port = _free_port()
    env = {**os.environ, "MINICPM4_API_KEY": "k3y"}
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "minicpm4", "serve", "--port", str(port), "--threads", "1",
                             "--sparse", "off", "--kv-cache-tokens", "2048", "--log-level", "warning"],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        assert httpx.get(url + "/v1/models").status_code == 401  # MINICPM4_API_KEY applies
        lines: list[str] = []
        first = threading.Event()

        def read_stream():
            body = {"messages": [{"role": "user", "content": "What is a river?"}], "max_tokens": 200,
                    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
            with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60,
                              headers={"Authorization": "Bearer k3y"}) as res:
                for line in res.iter_lines():
                    if line:
                        lines.append(line)
                        first.set()

        reader = threading.Thread(target=read_stream)
        reader.start()
        assert first.wait(30)
        proc.send_signal(signal.SIGTERM)
        at_signal = len(lines)
        reader.join(timeout=60)
        # uvicorn re-raises the signal once it has shut down cleanly, so the exit is "killed by SIGTERM"
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM), (tmp_path / "serve.log").read_text()
        assert at_signal < 100 and lines[-1] == "data: [DONE]"  # mid-stream at SIGTERM, then ran to its end
        usage = json.loads(lines[-2][len("data: "):])["usage"]
        assert usage["completion_tokens"] == 200
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
