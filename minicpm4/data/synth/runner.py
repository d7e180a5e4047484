"""Drive synthesis jobs against a chat backend: many requests in flight, resumable output, near-duplicate removal,
the review queue and the stats file.

The loop keeps up to `concurrency` requests in flight: it starts jobs (track.py) until their pending requests fill
the window, sends all pending requests at once, hands each job its replies, and writes the records a finished job
returns. Requests are grouped by (offered tools, temperature, seed), since one `complete_batch` call shares those:
LocalBackend batches each group in its engine (continuous batching); for an endpoint the groups go out together
from a thread pool and EndpointBackend's own pool sends each group's requests concurrently. One round waits for
its slowest reply, which is the price of a loop with no asyncio in it.

Resume: ids already in the output (kept or rejected) are never asked again; a job some of whose records exist
regenerates only the rest. Kept records already in the file seed the near-duplicate filter, so a resumed run
dedups against them too. A request the server refuses (HTTP 400/413/422, e.g. a prompt over its context, or a
ValueError from a local engine) rejects that job's records with "request failed: ..."; an unreachable endpoint
or any other error stops the run (the stats file says completed: false; run again to continue).
"""

from __future__ import annotations

import time
import urllib.error
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

from minicpm4.apps.chat_backend import AssistantTurn, LocalBackend, Sampling
from minicpm4.data.synth.dedup import NearDuplicateFilter, shingles
from minicpm4.data.synth.records import RecordWriter, dedup_text, load_records
from minicpm4.data.synth.review import ReviewQueue, review_path
from minicpm4.data.synth.track import Job, JobSteps, Request, Track, TrackContext
from minicpm4.data.synth.verdict import Verdict, quote
from minicpm4.errors import UserError


@dataclass
class RunConfig:
    out: Path
    limit: int | None = None  # seed items per track; None = all
    concurrency: int = 8
    review_fraction: float = 0.05
    review_seed: int = 0
    dedup_threshold: float = 0.8
    show_progress: bool = True
    kept_only: Path | None = None  # also write the kept records here (the SFT set) when the run ends

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.concurrency < 1:
            raise UserError(f"--concurrency: must be >= 1, got {self.concurrency}")
        if self.limit is not None and self.limit < 1:
            raise UserError(f"--limit: must be >= 1, got {self.limit}")


def stats_path(out: str | Path) -> Path:
    return Path(out).with_suffix(".stats.json")


def measure_lengths(ctx: TrackContext, backend) -> None:
    """Count lengths in model tokens when the model runs here (its tokenizer); else keep the chars/4 estimate."""
    if isinstance(backend, LocalBackend):
        tok = backend.pipeline.tokenizer
        ctx.length = lambda text: len(tok.encode(text, add_bos=False))
        ctx.length_unit = "tokens (model tokenizer)"


class RequestFailed(Exception):
    """One request the backend refused; its job's records are rejected with the message."""


def _refused(e: Exception) -> bool:
    if isinstance(e, UserError):
        cause = e.__cause__
        return isinstance(cause, urllib.error.HTTPError) and cause.code in (400, 413, 422)
    return isinstance(e, ValueError)


class Dispatcher:
    """Requests -> replies in order, through backend.complete_batch per (tools, temperature, seed) group."""

    def __init__(self, backend, sampling: Sampling, concurrency: int) -> None:
        self.backend, self.sampling, self.concurrency = backend, sampling, concurrency
        self.parallel = not isinstance(backend, LocalBackend)  # one engine in this process: batch, don't thread

    def _sampling(self, r: Request) -> Sampling:
        s = self.sampling
        seed = None if s.seed is None else s.seed + r.sample_index
        return replace(s, temperature=s.temperature if r.temperature is None else r.temperature, seed=seed)

    def _group(self, requests: list[Request]) -> list[tuple[list[int], list[dict] | None, Sampling]]:
        import json

        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            s = self._sampling(r)
            key = (json.dumps(r.tools, sort_keys=True) if r.tools else "", s.temperature, s.seed)
            groups.setdefault(key, []).append(i)
        return [(idx, requests[idx[0]].tools, self._sampling(requests[idx[0]])) for idx in groups.values()]

    def _call(self, requests: list[Request], idx: list[int], tools, sampling) -> list[AssistantTurn | RequestFailed]:
        conversations = [requests[i].messages for i in idx]
        try:
            return list(self.backend.complete_batch(conversations, tools, sampling))
        except Exception as e:  # noqa: BLE001 - sorted out below: refusals become per-request failures
            if not _refused(e):
                raise
        out: list[AssistantTurn | RequestFailed] = []
        for messages in conversations:  # find which ones the backend refuses
            try:
                out.append(self.backend.complete(messages, tools, sampling))
            except Exception as e:  # noqa: BLE001
                if not _refused(e):
                    raise
                out.append(RequestFailed(str(e)))
        return out

    def run(self, requests: list[Request]) -> list[AssistantTurn | RequestFailed]:
        groups = self._group(requests)
        replies: list = [None] * len(requests)
        if self.parallel and len(groups) > 1:
            with ThreadPoolExecutor(max_workers=min(len(groups), self.concurrency)) as pool:
                results = list(pool.map(lambda g: self._call(requests, *g), groups))
        else:
            results = [self._call(requests, *g) for g in groups]
        for (idx, _, _), got in zip(groups, results):
            assert len(got) == len(idx), f"the backend answered {len(got)} of {len(idx)} conversations"
            for i, turn in zip(idx, got):
                replies[i] = turn
        return replies


class DuplicateIndex:
    """NearDuplicateFilter over kept records, plus which kept record a duplicate repeats: the filter only says
    yes or no, so on a hit the kept shingle sets are scanned for the closest (duplicates are the rare case)."""

    def __init__(self, threshold: float) -> None:
        self.filter = NearDuplicateFilter(threshold=threshold)
        self.kept: dict[str, set[str]] = {}

    def add(self, key: str, text: str) -> str | None:
        """None when text was kept; else the id of the kept record it nearly duplicates."""
        grams = shingles(text, self.filter.shingle_words)
        if self.filter.add(key, text):
            self.kept[key] = grams
            return None

        def jaccard(k: str) -> float:
            other = self.kept[k]
            return len(grams & other) / max(1, len(grams | other))

        return max(self.kept, key=jaccard) if self.kept else "an earlier record"


def reason_class(reason: str) -> str:
    """A reason without its specifics, for counting: "wrong answer: got 12, expected 77" -> "wrong answer",
    "near duplicate of knowledge:x:qa" -> "near duplicate"."""
    import re

    if reason.startswith("near duplicate of "):
        return "near duplicate"
    head = re.split(r"[:(]", reason, maxsplit=1)[0].strip()
    return re.sub(r"\d+", "N", head) or reason


@dataclass
class TrackStats:
    generated: int = 0
    kept: int = 0
    rejected: int = 0
    already_done: int = 0  # records found in the output at start (resume)
    borderline: int = 0
    queued_for_review: int = 0
    reasons: Counter = field(default_factory=Counter)
    first: float | None = None
    last: float | None = None

    def to_dict(self) -> dict:
        span = (self.last - self.first) if self.first is not None and self.last is not None else 0.0
        return {"generated": self.generated, "kept": self.kept, "rejected": self.rejected,
                "already_done": self.already_done, "borderline": self.borderline,
                "queued_for_review": self.queued_for_review, "rejected_by_reason": dict(self.reasons.most_common()),
                "seconds": round(span, 3), "records_per_s": round(self.generated / span, 3) if span > 0 else None}


class Runner:
    def __init__(self, tracks: Sequence[Track], backend, sampling: Sampling, config: RunConfig) -> None:
        self.tracks, self.config = list(tracks), config
        self.dispatcher = Dispatcher(backend, sampling, config.concurrency)
        self.stats = {t.name: TrackStats() for t in self.tracks}
        self.backend_name = getattr(backend, "base_url", None) or type(backend).__name__
        self.completed = False

    def run(self) -> dict:
        from tqdm import tqdm

        config, t0 = self.config, time.perf_counter()
        existing = load_records(config.out)  # cuts a truncated last line
        self.done = {r["id"] for r in existing}
        self.dedup = DuplicateIndex(config.dedup_threshold)
        for r in existing:
            if r.get("kept"):
                self.dedup.add(r["id"], dedup_text(r))
        jobs: list[Job] = []
        for track in self.tracks:
            for job in track.jobs(config.limit):
                have = sum(i in self.done for i in job.record_ids)
                self.stats[track.name].already_done += have
                if have < len(job.variants):
                    jobs.append(job)
        todo = sum(len(j.variants) for j in jobs) - sum(i in self.done for j in jobs for i in j.record_ids)
        self.review = ReviewQueue(review_path(config.out), config.review_fraction, config.review_seed)
        self.bar = tqdm(total=todo, unit="rec", desc="synth", disable=not config.show_progress, dynamic_ncols=True)
        try:
            with RecordWriter(config.out) as self.writer:
                self._loop(deque(jobs))
            self.completed = True
        finally:
            self.bar.close()
            self.review.close()
            stats = self.summary(time.perf_counter() - t0)
            from minicpm4.io import write_text_atomic
            import json

            write_text_atomic(stats_path(config.out), json.dumps(stats, indent=2) + "\n")
        if config.kept_only is not None:
            from minicpm4.data.synth.records import export_kept

            stats["kept_exported"] = export_kept(config.out, config.kept_only)
        return stats

    # ---- the loop ----

    def _loop(self, queue: deque) -> None:
        active: list[tuple[Job, JobSteps, list[Request]]] = []
        while queue or active:
            while queue and (not active or sum(len(a[2]) for a in active) < self.config.concurrency):
                job = queue.popleft()
                self._advance(job, job.start(), None, active)
            if not active:
                continue
            replies = self.dispatcher.run([r for _, _, reqs in active for r in reqs])
            current, active, pos = active, [], 0
            for job, steps, reqs in current:
                got, pos = replies[pos:pos + len(reqs)], pos + len(reqs)
                failed = next((i for i, t in enumerate(got) if isinstance(t, RequestFailed)), None)
                if failed is None:
                    self._advance(job, steps, got, active)
                    continue
                steps.close()  # the job cannot go on without that reply: all its records say why
                why = Verdict.failed(f"request failed: {quote(str(got[failed]), 200)}")
                self._finish(job, [job.record(v, reqs[failed].messages, why) for v in job.variants])

    def _advance(self, job: Job, steps: JobSteps, replies, active: list) -> None:
        stats = self.stats[job.track]
        if stats.first is None:
            stats.first = time.perf_counter()
        try:
            requests = steps.send(replies)
        except StopIteration as stop:
            self._finish(job, stop.value or [])
            return
        assert requests, f"{job.track} job {job.seed}: a step must ask for at least one reply"
        active.append((job, steps, requests))

    def _finish(self, job: Job, records) -> None:
        got = sorted(r.id for r in records)
        assert got == sorted(job.record_ids), f"{job.track} job {job.seed} returned {got}, announced {job.record_ids}"
        stats = self.stats[job.track]
        for record in records:
            if record.id in self.done:
                continue
            d = record.to_dict()
            if d["kept"]:
                duplicate_of = self.dedup.add(d["id"], dedup_text(d))
                if duplicate_of is not None:
                    d["kept"], d["reason"] = False, f"near duplicate of {duplicate_of}"
            self.writer.write(d)
            self.done.add(d["id"])
            stats.generated += 1
            stats.last = time.perf_counter()
            if d["kept"]:
                stats.kept += 1
                stats.borderline += bool(d["meta"].get("borderline"))
                stats.queued_for_review += self.review.consider(d) is not None
            else:
                stats.rejected += 1
                stats.reasons[reason_class(d["reason"])] += 1
            self.bar.update(1)
            self.bar.set_postfix(kept=sum(s.kept for s in self.stats.values()),
                                 rejected=sum(s.rejected for s in self.stats.values()), refresh=False)

    def summary(self, seconds: float) -> dict:
        generated = sum(s.generated for s in self.stats.values())
        return {"out": str(self.config.out), "completed": self.completed, "backend": self.backend_name,
                "concurrency": self.config.concurrency, "seconds": round(seconds, 3),
                "records": generated, "records_per_s": round(generated / seconds, 3) if seconds > 0 else None,
                "tracks": {t.name: {**self.stats[t.name].to_dict(), "info": t.info()} for t in self.tracks}}


def run_synthesis(tracks: Sequence[Track], backend, sampling: Sampling, config: RunConfig) -> dict:
    """Synthesise every track's records into config.out (resuming what is there); the stats dict, also written to
    FILE.stats.json."""
    return Runner(tracks, backend, sampling, config).run()
