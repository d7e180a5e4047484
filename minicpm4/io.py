"""Atomic file writes: write a temp file in the same folder, then `os.replace` it onto the target, so a
reader (or a crash half-way) never sees half a file (DESIGN.md principle 17). A leaf module: it imports
nothing from the package, so config, checkpoint, train/ and data/ can all use it."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, TypeVar

K = TypeVar("K")


def _temp_beside(path: Path) -> Path:
    """An empty temp file next to path (same filesystem, so the rename is atomic), named like the target
    with its suffix kept last (matplotlib's savefig picks the format from it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + path.suffix)
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp creates 0600; the result should read like any other written file
    return Path(tmp)


@contextmanager
def atomic_paths(paths: Mapping[K, str | Path]) -> Iterator[dict[K, Path]]:
    """Yield {key: temp path} to write; when the block ends cleanly each temp replaces its target (in order),
    so all the files are published together; on any exception the temps are deleted and no target changes."""
    temps: dict[K, Path] = {}
    try:
        for key, path in paths.items():
            temps[key] = _temp_beside(Path(path))
        yield temps
        for key, path in paths.items():
            os.replace(temps[key], path)
    except BaseException:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path to write; it replaces path when the block ends cleanly, and is deleted otherwise."""
    with atomic_paths({0: path}) as temps:
        yield temps[0]


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write text (UTF-8) via a temp file in the same folder + rename."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def fsync_files(folder: Path) -> None:
    """Flush every file directly in folder to disk: do it before the rename that publishes the folder."""
    for f in folder.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def jsonl_records(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """(line number, parsed JSON) for each non-blank line of a JSONL file; a bad line raises ValueError naming
    the file and line."""
    import json

    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON: {e}") from None

