"""The code sandbox (minicpm4/train/rl/sandbox.py): what runs inside cannot reach the network, cannot write
outside its folder, is killed at its time limit with everything it started, and stays within its memory."""

from __future__ import annotations

import os
import secrets
import socket
import textwrap
import time
from pathlib import Path

import pytest

from minicpm4.train.rl import sandbox
from minicpm4.train.rl.sandbox import SandboxUnavailable, check_sandbox, run_python


def run(code: str, **kw):
    return run_python(textwrap.dedent(code), **kw)


def test_missing_bwrap_raises_with_the_fix(monkeypatch):
    # A fresh probe with bwrap off PATH: a UserError that names the package and the make target, never a
    # silent unsandboxed run.
    monkeypatch.setattr(sandbox, "_probe_error", [])
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(SandboxUnavailable, match=r"bubblewrap.*make rl-packages"):
        run_python("print('hi')")
    with pytest.raises(SandboxUnavailable):  # the failed probe is cached
        check_sandbox()


def test_runs_code_and_captures_output(bwrap):
    r = run("""
        import sys
        print("out")
        print("err", file=sys.stderr)
        sys.exit(3)
    """)
    assert (r.returncode, r.stdout, r.stderr, r.timed_out) == (3, "out\n", "err\n", False)
    assert not r.ok and 0 < r.seconds < 10


def test_no_network_neither_internet_nor_the_hosts_loopback(bwrap):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.setblocking(False)
    port = server.getsockname()[1]
    try:
        r = run(f"""
            import socket
            for addr in [("1.1.1.1", 53), ("127.0.0.1", {port})]:
                try:
                    socket.create_connection(addr, timeout=2).close()
                    print("connected", addr)
                except OSError as e:
                    print("blocked", addr, type(e).__name__)
        """)
        assert r.stdout.count("blocked") == 2 and "connected" not in r.stdout, r.stdout + r.stderr
        with pytest.raises(BlockingIOError):  # nothing ever reached the host's server
            server.accept()
    finally:
        server.close()


def test_cannot_write_outside_its_folder(bwrap, tmp_path):
    name = f"minicpm4-sandbox-escape-{secrets.token_hex(4)}"
    targets = [tmp_path / name, Path.home() / name, Path("/tmp") / name, Path.cwd() / name]
    try:
        r = run(f"""
            import os
            for path in {[str(t) for t in targets]!r}:
                try:
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    with open(path, "w") as f:
                        f.write("escaped")
                    print("wrote", path)  # only ever into the sandbox's private /tmp
                except OSError as e:
                    print("refused", path, e.strerror)
        """)
        assert r.ok, r.stderr
        assert r.stdout.count("refused") >= 2  # $HOME and the repository are read-only
        assert [t for t in targets if t.exists()] == []
    finally:
        for t in targets:
            t.unlink(missing_ok=True)


def test_writes_inside_its_folder_and_keeps_a_given_workdir(bwrap, tmp_path):
    work = tmp_path / "work"
    r = run("open('result.txt', 'w').write('inside'); import os; print(os.getcwd())", workdir=work)
    assert r.ok, r.stderr
    assert (work / "result.txt").read_text() == "inside" and (work / "main.py").is_file()
    assert Path(r.stdout.strip()) == work.resolve()
    # Without a workdir the fresh folder is deleted afterwards.
    r = run("print(__import__('os').getcwd())")
    assert r.ok and r.stdout.strip().startswith(("/tmp", "/var")) and not Path(r.stdout.strip()).exists()


def test_time_limit_kills_the_run_and_everything_it_started(bwrap, tmp_path):
    work = tmp_path / "work"
    start = time.monotonic()
    r = run("""
        import subprocess, sys, time
        # a daemon in its own session that keeps appending to a file, and a parent that never ends
        subprocess.Popen([sys.executable, "-c",
                          "import time\\nwhile True:\\n    open('beat', 'a').write('.')\\n    time.sleep(0.02)"],
                         start_new_session=True)
        while True:
            time.sleep(1)
    """, timeout_s=1.0, workdir=work)
    assert r.timed_out and not r.ok and time.monotonic() - start < 6
    time.sleep(0.3)
    size = (work / "beat").stat().st_size
    time.sleep(0.5)
    assert (work / "beat").stat().st_size == size  # the grandchild died with the sandbox


def test_memory_limit_is_enforced(bwrap):
    r = run("""
        try:
            block = bytearray(1024 * 2**20)
            print("allocated")
        except MemoryError:
            print("MemoryError")
        grow = []
        try:
            while True:
                grow.append(bytearray(16 * 2**20))
        except MemoryError:
            print("stopped at", len(grow) * 16, "MiB")
    """, memory_mb=256)
    assert r.stdout.startswith("MemoryError\nstopped at"), r.stdout + r.stderr
    assert int(r.stdout.split()[-2]) < 256


def test_files_output_and_privileges_are_capped(bwrap):
    r = run("""
        import sys
        try:
            with open("big", "wb") as f:
                f.write(b"x" * (32 * 2**20))
            print("wrote 32 MiB")
        except OSError as e:
            print("refused", e.errno)
        caps = [l for l in open("/proc/self/status") if l.startswith("CapEff")]
        print(caps[0].split()[1])
        sys.stdout.write("y" * (1 * 2**20))
    """)
    lines = r.stdout.splitlines()
    assert lines[0] == "refused 27"  # EFBIG: RLIMIT_FSIZE
    assert int(lines[1], 16) == 0  # no capabilities, even when the caller is root
    assert len(r.stdout) < sandbox.MAX_OUTPUT_BYTES + 200 and "truncated" in r.stdout


def test_environment_is_minimal(bwrap, monkeypatch):
    monkeypatch.setenv("MINICPM4_SECRET_TOKEN", "hunter2")
    r = run("import os; print(sorted(os.environ))")
    assert "MINICPM4_SECRET_TOKEN" not in r.stdout and "HOME" in r.stdout
    assert os.environ["MINICPM4_SECRET_TOKEN"] == "hunter2"
