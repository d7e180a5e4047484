"""Run untrusted Python (a policy's code answers) in a bubblewrap sandbox with resource limits.

The report runs RL code rewards in a Firejail sandbox (MINICPM4.md §7.1); we use bubblewrap (`bwrap`, Debian's
`bubblewrap`, installed by `make rl-packages`), which needs no daemon and no setuid helper.

What one `run_python` call isolates:
- network: a fresh network namespace (`--unshare-net`) with only its own loopback, so neither the internet nor a
  server on the host's 127.0.0.1 is reachable;
- filesystem writes: the host is mounted read-only (`--ro-bind / /`); the only writable host path is the run's
  own folder; /tmp and /dev/shm are small private tmpfs (16 MiB each), /run (host sockets: Docker, D-Bus) is
  hidden behind an empty tmpfs, /dev is a minimal read-only device set;
- processes: its own PID namespace (it sees and signals only itself), IPC namespace and session
  (`--new-session`: no typing into the caller's terminal); every capability is dropped (`--cap-drop ALL`, which
  matters when run as root: bwrap would otherwise keep them and the code could remount / read-write);
- time: a wall-clock timeout kills bwrap's process group, and `--die-with-parent` plus the PID namespace take
  everything started inside down with it (a double-forked daemon included); RLIMIT_CPU backs this up;
- memory and output: RLIMIT_AS (address space, `memory_mb`), RLIMIT_FSIZE (no file, stdout included, beyond
  16 MiB), RLIMIT_NPROC (see `_process_limit`), RLIMIT_NOFILE, no core dumps; captured output is truncated.

What it does not isolate:
- reading: the code can read every file the calling user can (keys in $HOME included) - it just cannot send them
  anywhere or change them;
- the disk: files in the run's folder are capped per file (RLIMIT_FSIZE), not in number;
- CPU share and kernel attack surface: no cgroup, no seccomp filter; it shares the host kernel;
- RLIMIT_NPROC counts all of the user's processes and is not enforced for root at all; a fork bomb is bounded
  only by the PID namespace dying at the timeout (root) or by the limit (other users).

If bwrap is missing or cannot start a sandbox here, `run_python` raises `SandboxUnavailable`: it never falls
back to running the code unsandboxed.
"""

from __future__ import annotations

import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from minicpm4.errors import UserError

MAX_OUTPUT_BYTES = 64 * 1024  # kept of stdout/stderr each: test harness lines and a traceback fit many times over
MAX_FILE_BYTES = 16 * 2**20  # RLIMIT_FSIZE: a print loop is stopped (SIGXFSZ) before it fills the disk
PRIVATE_TMPFS_BYTES = 16 * 2**20  # size of the sandbox's own /tmp and /dev/shm (tmpfs lives in RAM)
MAX_OPEN_FILES = 256
EXTRA_PROCESSES = 64  # threads/processes the code may add on top of what exists (see _process_limit)
INSTALL_HINT = "install Debian's bubblewrap (`make rl-packages`, or `apt-get install bubblewrap`)"


class SandboxUnavailable(UserError):
    """bubblewrap is missing or cannot create a sandbox on this machine; code rewards cannot run."""


@dataclass(frozen=True)
class SandboxResult:
    returncode: int  # the code's exit status; killed by signal N inside -> 128 + N (bwrap's convention);
    # killed at the wall-clock timeout -> -9
    stdout: str  # at most MAX_OUTPUT_BYTES of each stream, then a "[... truncated]" line
    stderr: str
    timed_out: bool  # hit the wall-clock or CPU-time limit
    seconds: float  # wall-clock time of the whole run, sandbox start-up included

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


def bwrap_command(folder: Path) -> list[str]:
    """The bwrap argv (without the command) that confines a run to `folder`. Order matters: later mounts go on
    top of earlier ones, and /dev is made read-only after its writable /dev/shm is mounted."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise SandboxUnavailable(f"the code sandbox needs bubblewrap, and `bwrap` is not on PATH: {INSTALL_HINT}")
    d = str(folder)
    size = str(PRIVATE_TMPFS_BYTES)
    return [bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--size", size, "--tmpfs", "/dev/shm",
            "--remount-ro", "/dev", "--proc", "/proc", "--size", size, "--tmpfs", "/tmp", "--tmpfs", "/run",
            "--bind", d, d, "--chdir", d, "--unshare-net", "--unshare-pid", "--unshare-ipc",
            "--die-with-parent", "--new-session", "--cap-drop", "ALL"]


def _process_limit() -> int:
    """RLIMIT_NPROC counts every thread of the user, not just the sandbox's, so an absolute number would fail
    (or pass) depending on what else the user runs (a training job has hundreds of threads). Allow the machine's
    current thread count (an upper bound of the user's, from /proc/loadavg) plus EXTRA_PROCESSES."""
    try:
        total = int(Path("/proc/loadavg").read_text().split()[3].split("/")[1])
    except (OSError, IndexError, ValueError):
        total = 4096
    return total + EXTRA_PROCESSES


def _limits_setter(timeout_s: float, memory_mb: int):
    """A preexec_fn that only calls setrlimit with numbers computed here, in the parent: the forked child of a
    threaded program (batch_rewards runs many of these at once) must not allocate or import before exec."""
    cpu = math.ceil(timeout_s) + 1  # SIGXCPU at the soft limit, SIGKILL one second later at the hard one
    limits = [
        (resource.RLIMIT_CPU, (cpu, cpu + 1)),
        (resource.RLIMIT_AS, (memory_mb * 2**20, memory_mb * 2**20)),
        (resource.RLIMIT_FSIZE, (MAX_FILE_BYTES, MAX_FILE_BYTES)),
        (resource.RLIMIT_NPROC, (_process_limit(),) * 2),
        (resource.RLIMIT_NOFILE, (MAX_OPEN_FILES, MAX_OPEN_FILES)),
        (resource.RLIMIT_CORE, (0, 0)),
    ]
    setrlimit = resource.setrlimit

    def set_limits() -> None:
        for which, value in limits:
            setrlimit(which, value)

    return set_limits


def _read_capped(f) -> str:
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(0)
    text = f.read(MAX_OUTPUT_BYTES).decode("utf-8", errors="replace")
    if size > MAX_OUTPUT_BYTES:
        text += f"\n[... truncated: {size - MAX_OUTPUT_BYTES} more bytes]\n"
    return text


def _sandbox_env(folder: Path) -> dict[str, str]:
    """A minimal environment: nothing of the caller's (tokens, proxies) leaks in; HOME is the run's folder so
    tools that write there stay inside. `python -I` ignores PYTHON* variables anyway."""
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(folder), "TMPDIR": "/tmp", "LANG": "C.UTF-8"}


def _run_confined(argv: list[str], folder: Path, timeout_s: float, memory_mb: int) -> SandboxResult:
    start = time.monotonic()
    timed_out = False
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        # start_new_session: bwrap leads its own process group, so one killpg reaches it whatever it started
        proc = subprocess.Popen(bwrap_command(folder) + argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                cwd=folder, env=_sandbox_env(folder), start_new_session=True,
                                preexec_fn=_limits_setter(timeout_s, memory_mb))
        try:
            returncode = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:  # it ended between the timeout and the kill
                pass
            returncode = proc.wait()
        # 128 + SIGXCPU: the CPU-time limit fired first (threads burn CPU time faster than wall-clock time)
        timed_out = timed_out or returncode == 128 + signal.SIGXCPU
        return SandboxResult(returncode=returncode, stdout=_read_capped(out), stderr=_read_capped(err),
                             timed_out=timed_out, seconds=time.monotonic() - start)


_probe_lock = threading.Lock()
_probe_error: list[str | None] = []  # [] = not probed yet; [None] = works; [message] = unavailable


def check_sandbox() -> None:
    """Raise SandboxUnavailable unless bwrap can start a sandbox here. Probed once per process (a trivial
    Python run under the real flags and limits), then cached: missing user-namespace support or an AppArmor
    policy shows up here, with bwrap's own words."""
    with _probe_lock:
        if not _probe_error:
            _probe_error.append(_probe())
    if _probe_error[0] is not None:
        raise SandboxUnavailable(_probe_error[0])


def _probe() -> str | None:
    try:
        with tempfile.TemporaryDirectory(prefix="minicpm4-sandbox-probe-") as d:
            result = _run_confined([sys.executable, "-I", "-c", "print('ok')"], Path(d), 30.0, 512)
    except SandboxUnavailable as e:
        return str(e)
    except OSError as e:
        return f"the code sandbox could not start bwrap ({e}): {INSTALL_HINT}"
    if result.ok and result.stdout.strip() == "ok":
        return None
    why = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
    return (f"bwrap is installed but cannot start a sandbox here ({why}); it needs user namespaces or root: "
            f"{INSTALL_HINT} and check `bwrap --ro-bind / / true`")


def run_python(code: str, *, timeout_s: float = 5.0, memory_mb: int = 512,
               workdir: Path | None = None) -> SandboxResult:
    """Run `code` as a script (`python -I -B main.py`) in a fresh folder under the sandbox; the folder is deleted
    afterwards unless `workdir` is given (it is created if missing and kept, with main.py and whatever the code
    wrote). The code's stdin is empty. Never raises for what the code does; raises SandboxUnavailable when the
    sandbox cannot run."""
    if timeout_s <= 0 or memory_mb < 32:
        raise ValueError(f"run_python: timeout_s must be > 0 and memory_mb >= 32 (got {timeout_s}, {memory_mb})")
    check_sandbox()
    if workdir is not None:
        folder = Path(workdir).resolve()
        folder.mkdir(parents=True, exist_ok=True)
        return _run_script(code, folder, timeout_s, memory_mb)
    with tempfile.TemporaryDirectory(prefix="minicpm4-sandbox-") as d:
        return _run_script(code, Path(d).resolve(), timeout_s, memory_mb)


def _run_script(code: str, folder: Path, timeout_s: float, memory_mb: int) -> SandboxResult:
    (folder / "main.py").write_text(code, encoding="utf-8")
    # -I: no user site-packages, no PYTHON* variables, script folder not on sys.path; -B: no .pyc files
    return _run_confined([sys.executable, "-I", "-B", "main.py"], folder, timeout_s, memory_mb)
