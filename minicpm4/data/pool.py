"""A raw pool of documents of very different knowledge density, read offline from what a Debian system ships:
the negatives (and the haystack) UltraClean's quality classifier is trained and run on (MINICPM4.md §8.1).

    minicpm4 data pool --out build/data/pool [--max-per-kind N] [--cap man=500] [--root DIR ...]

Kinds (relative to each root; the first root holding a path wins, like an overlay):
    changelog  usr/share/doc/*/changelog.Debian.gz, changelog.gz: one document per entry (short ones grouped)
    licence    usr/share/common-licenses/*           copyright  usr/share/doc/*/copyright
    man        usr/share/man/man{1,5,7,8}/*.gz (troff rendered by pool_readers.troff_to_text)
    html       usr/share/doc/**/*.html                source     usr/lib/python3*/**/*.py, shell scripts in usr/bin
    news       usr/share/doc/**/NEWS*                 readme     usr/share/doc/**/README*, *.txt

Reproducible: files are listed in sorted order, shuffled with a per-kind seed, interleaved across packages and
read until the kind's cap is met; long files are split into parts of at most max_chars, parts shorter than min_chars are dropped, and exact
duplicate texts are kept once. Writes out/pool.jsonl ({"id", "kind", "package", "path", "text"}; id =
kind:relative path:part) and out/manifest.json (counts, chars, package versions, config, sha256 of pool.jsonl).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from minicpm4.data import pool_readers as readers
from minicpm4.errors import UserError

KINDS = ("changelog", "licence", "copyright", "man", "html", "source", "news", "readme")
MAN_SECTIONS = ("man1", "man5", "man7", "man8")
# Where each kind lives; a root must hold at least one of these to be a Debian-like tree.
LOCATIONS = ("usr/share/doc", "usr/share/common-licenses", "usr/share/man", "usr/lib", "usr/bin")


@dataclass
class PoolConfig:
    out_dir: Path = Path("build/data/pool")
    roots: tuple[Path, ...] = (Path("/"),)
    max_per_kind: int = 2000
    caps: dict[str, int] = field(default_factory=dict)  # per-kind overrides of max_per_kind
    min_chars: int = 200  # shorter parts say too little to classify
    max_chars: int = 8000  # ~2K tokens: long files become several documents
    max_parts_per_file: int = 4  # so one huge changelog or licence cannot fill its kind
    max_file_bytes: int = 1_000_000  # read at most this much of a file (gcc's changelog is 10x that)
    seed: int = 0

    def cap(self, kind: str) -> int:
        return self.caps.get(kind, self.max_per_kind)

    def validate(self) -> None:
        for root in self.roots:
            if not Path(root).is_dir():
                raise UserError(f"--root {root}: no such folder")
            if not any((Path(root) / loc).is_dir() for loc in LOCATIONS):
                raise UserError(f"--root {root}: holds none of {', '.join(LOCATIONS)}")
        unknown = sorted(set(self.caps) - set(KINDS))
        if unknown:
            raise UserError(f"--cap {unknown[0]}: unknown kind; choose from {', '.join(KINDS)}")
        if self.max_per_kind < 0 or any(v < 0 for v in self.caps.values()):
            raise UserError("--max-per-kind/--cap: expected counts >= 0")
        if not 0 < self.min_chars <= self.max_chars:
            raise UserError(f"--min-chars {self.min_chars} / --max-chars {self.max_chars}: need 0 < min <= max")


# ---------------------------------------------------------------- finding files


def _doc_kind(name: str) -> str | None:
    """The kind of a file under usr/share/doc/<package>/ by its name, or None."""
    lower = name.lower()
    bare = lower.removesuffix(".gz")
    if bare in ("changelog", "changelog.debian"):
        return "changelog"
    if lower == "copyright":
        return "copyright"
    if bare.endswith((".html", ".htm")):
        return "html"
    if lower.startswith("news"):
        return "news"
    if lower.startswith("readme") or bare.endswith(".txt"):
        return "readme"
    return None


def _walk_files(top: Path):
    """Regular files under top, sorted; symlinked files and folders are skipped (they repeat other files)."""
    for folder, dirs, files in os.walk(top):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            path = Path(folder) / name
            if not path.is_symlink() and path.is_file():
                yield path


def list_candidates(root: Path) -> dict[str, list[str]]:
    """{kind: sorted relative paths} of every file of each kind under root."""
    found: dict[str, list[str]] = {k: [] for k in KINDS}

    def add(kind: str, path: Path) -> None:
        found[kind].append(path.relative_to(root).as_posix())

    for path in _walk_files(root / "usr/share/doc"):
        kind = _doc_kind(path.name)
        if kind and (kind not in ("changelog", "copyright") or path.parent.parent == root / "usr/share/doc"):
            add(kind, path)
    for path in _walk_files(root / "usr/share/common-licenses"):
        add("licence", path)
    for section in MAN_SECTIONS:
        for path in _walk_files(root / "usr/share/man" / section):
            add("man", path)
    for lib in sorted((root / "usr/lib").glob("python3*")):
        for path in _walk_files(lib):
            if path.suffix == ".py":
                add("source", path)
    for bin_dir in ("usr/bin", "usr/sbin"):
        for path in _walk_files(root / bin_dir):
            if readers.is_shell_script(path):
                add("source", path)
    return {k: sorted(v) for k, v in found.items()}


# ---------------------------------------------------------------- packages


class PackageIndex:
    """Which Debian package a file belongs to: its usr/share/doc/<package> folder, else dpkg's file lists
    (var/lib/dpkg/info/*.list, read once); versions from one `dpkg-query -W` call when the root has a dpkg
    database."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._owners: dict[str, str] | None = None

    def package(self, rel: str) -> str:
        parts = rel.split("/")
        if rel.startswith("usr/share/doc/") and len(parts) > 4:
            return parts[3]
        if self._owners is None:
            self._owners = {}
            for listing in sorted((self.root / "var/lib/dpkg/info").glob("*.list")):
                name = listing.stem.split(":")[0]  # libc6:amd64.list -> libc6
                for line in listing.read_text(encoding="utf-8", errors="replace").splitlines():
                    self._owners.setdefault(line, name)
        # merged /usr: dpkg may list /bin/x for a file now at /usr/bin/x
        return self._owners.get("/" + rel) or self._owners.get("/" + rel.removeprefix("usr/")) or "unknown"

    def versions(self) -> dict[str, str]:
        admin = self.root / "var/lib/dpkg"
        if not (admin / "status").is_file() or shutil.which("dpkg-query") is None:
            return {}
        out = subprocess.run(["dpkg-query", f"--admindir={admin}", "-W", "-f=${Package}\t${Version}\n"],
                             capture_output=True, text=True, check=False).stdout
        return dict(line.split("\t", 1) for line in out.splitlines() if "\t" in line)


# ---------------------------------------------------------------- reading documents


def file_documents(kind: str, path: Path, cfg: PoolConfig) -> list[tuple[int, str]]:
    """(part index, text) of the documents one file yields; parts shorter than min_chars are left out."""
    text = readers.read_text(path, cfg.max_file_bytes)
    if text is None:
        return []
    if kind == "changelog":
        parts = readers.group_entries(readers.changelog_entries(text, debian="changelog.debian" in path.name.lower()),
                                      cfg.min_chars, cfg.max_chars)
    elif kind == "man":
        parts = [] if readers.is_man_alias(text) else readers.split_long(readers.troff_to_text(text), cfg.max_chars)
    elif kind == "html":
        parts = readers.split_long(readers.html_to_text(text), cfg.max_chars)
    else:
        parts = readers.split_long(readers.tidy(text), cfg.max_chars)
    kept = [(i, p) for i, p in enumerate(parts) if len(p) >= cfg.min_chars]
    return kept[:cfg.max_parts_per_file]


def _interleaved(rels: list[str], package, seed: str) -> list[str]:
    """A seeded shuffle, then round-robin over packages: every package's first file before any package's second,
    so one package with thousands of files (google-cloud-cli's man pages) cannot fill a kind on its own."""
    order = sorted(rels)
    random.Random(seed).shuffle(order)  # a str seed is hashed with sha512: the same order on every run
    turn: dict[str, int] = {}
    rounds = []
    for rel in order:
        pkg = package(rel)
        rounds.append(turn.get(pkg, 0))
        turn[pkg] = rounds[-1] + 1
    return [rel for _, rel in sorted(zip(rounds, order), key=lambda t: t[0])]  # stable: shuffle order per round


def build_pool(cfg: PoolConfig, log=print) -> dict:
    """Sample documents of each kind, write pool.jsonl and manifest.json atomically; returns the manifest."""
    from minicpm4.io import atomic_paths

    cfg.validate()
    t0 = time.perf_counter()
    roots = [Path(r) for r in cfg.roots]
    owner: dict[str, Path] = {}  # relative path -> the first root that holds it
    candidates: dict[str, list[str]] = {k: [] for k in KINDS}
    for root in roots:
        for kind, rels in list_candidates(root).items():
            for rel in rels:
                if rel not in owner:
                    owner[rel] = root
                    candidates[kind].append(rel)
    indexes = {root: PackageIndex(root) for root in roots}
    seen_texts: set[bytes] = set()
    docs: list[dict] = []
    stats = {k: {"candidates": len(v), "files_read": 0, "documents": 0, "chars": 0, "duplicates": 0,
                 "unreadable": 0} for k, v in candidates.items()}
    for kind in KINDS:
        order = _interleaved(candidates[kind], lambda rel: indexes[owner[rel]].package(rel), f"{cfg.seed}:{kind}")
        s = stats[kind]
        for rel in order:
            if s["documents"] >= cfg.cap(kind):
                break
            root = owner[rel]
            try:
                parts = file_documents(kind, root / rel, cfg)
            except (OSError, EOFError, ValueError):  # unreadable, truncated gzip, bad HTML
                s["unreadable"] += 1
                continue
            s["files_read"] += 1
            for part, text in parts:
                digest = hashlib.sha1(text.encode("utf-8")).digest()
                if digest in seen_texts:
                    s["duplicates"] += 1
                    continue
                if s["documents"] >= cfg.cap(kind):
                    break
                seen_texts.add(digest)
                docs.append({"id": f"{kind}:{rel}:{part}", "kind": kind, "package": indexes[root].package(rel),
                             "path": str(root / rel), "text": text})
                s["documents"] += 1
                s["chars"] += len(text)
        log(f"{kind:<10} {s['documents']:>6} documents {s['chars'] / 1e6:>7.2f} M chars "
            f"from {s['files_read']} of {s['candidates']} files")
    rank = {k: i for i, k in enumerate(KINDS)}
    docs.sort(key=lambda d: (rank[d["kind"]], d["id"]))
    used = sorted({d["package"] for d in docs} - {"unknown"})
    versions: dict[str, str] = {}
    for root in reversed(roots):  # the first root's versions win
        versions.update(indexes[root].versions())
    out = Path(cfg.out_dir)
    with atomic_paths({"pool": out / "pool.jsonl", "manifest": out / "manifest.json"}) as tmp:
        digest = hashlib.sha256()
        with open(tmp["pool"], "wb") as f:
            for d in docs:
                line = (json.dumps(d, ensure_ascii=False) + "\n").encode("utf-8")
                digest.update(line)
                f.write(line)
        manifest = {
            "documents": len(docs),
            "counts": {k: s["documents"] for k, s in stats.items()},
            "chars": {k: s["chars"] for k, s in stats.items()},
            "kinds": stats,
            "packages": len(used),
            "package_versions": {p: versions[p] for p in used if p in versions},
            "config": {**asdict(cfg), "out_dir": str(cfg.out_dir), "roots": [str(r) for r in cfg.roots]},
            "sha256": digest.hexdigest(),
            "seconds": round(time.perf_counter() - t0, 2),
        }
        tmp["manifest"].write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return manifest


# ---------------------------------------------------------------- command line


def _cap(value: str) -> tuple[str, int]:
    kind, _, count = value.partition("=")
    if not count.strip().isdigit():
        raise argparse.ArgumentTypeError(f"{value}: expected KIND=N, e.g. man=500")
    return kind.strip(), int(count)


def register_step(steps: argparse._SubParsersAction) -> None:
    d = PoolConfig()
    p = steps.add_parser("pool", help="a raw mixed-quality document pool from the Debian system (UltraClean negatives)",
                         description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=d.out_dir, help="output folder (default: %(default)s)")
    p.add_argument("--root", type=Path, nargs="+", action="extend", default=None, metavar="DIR",
                   help="filesystem roots to read (default: /); repeatable, the first holding a path wins")
    p.add_argument("--max-per-kind", type=int, default=d.max_per_kind, help="documents per kind (default: %(default)s)")
    p.add_argument("--cap", type=_cap, action="append", default=[], metavar="KIND=N",
                   help=f"per-kind override, repeatable; kinds: {', '.join(KINDS)}")
    p.add_argument("--min-chars", type=int, default=d.min_chars, help="default: %(default)s")
    p.add_argument("--max-chars", type=int, default=d.max_chars, help="longer files are split (default: %(default)s)")
    p.add_argument("--max-parts-per-file", type=int, default=d.max_parts_per_file, help="default: %(default)s")
    p.add_argument("--seed", type=int, default=d.seed, help="default: %(default)s")
    p.set_defaults(func=cmd_pool)


def cmd_pool(a: argparse.Namespace) -> None:
    cfg = PoolConfig(out_dir=a.out, roots=tuple(a.root or (Path("/"),)), max_per_kind=a.max_per_kind,
                     caps=dict(a.cap), min_chars=a.min_chars, max_chars=a.max_chars,
                     max_parts_per_file=a.max_parts_per_file, seed=a.seed)
    m = build_pool(cfg)
    print(f"{m['documents']} documents, {sum(m['chars'].values()) / 1e6:.2f} M chars, {m['packages']} packages "
          f"in {m['seconds']} s -> {Path(a.out) / 'pool.jsonl'} (sha256 {m['sha256'][:12]})")
