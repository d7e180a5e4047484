"""The human second stage of the dual-stage filter (MINICPM4.md §8.3: "automated verification + selective human
review"): a review queue next to the output, and the merge of its decisions back.

`FILE.review.jsonl` (beside `FILE.jsonl`) receives, as the run writes them, every kept record a verifier passed
only borderline (meta.borderline: e.g. "only 1/4 samples passed") plus a stable random sample of the other kept
records (--review-fraction; drawn by a hash of the id, so a resumed run samples the same ones). One object per
line with what a reviewer needs and an empty decision to fill in:

    {"id", "track", "why": "borderline: ..." | "sampled", "messages", "tools"?, "meta",
     "decision": "", "note": ""}

A reviewer sets "decision" to "accept" or "reject" (and optionally a "note"), then

    minicpm4 data synth review-apply --out FILE.jsonl [--kept-only SFT.jsonl]

rewrites FILE.jsonl: a rejected record becomes kept=false with reason "human review: rejected[: note]", an
accepted one gets meta.review = "accepted"; undecided entries stay as they are. Applying twice is harmless, and a
reject changed to accept later restores the record.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from minicpm4.data.synth.records import export_kept, load_records, write_records_atomic
from minicpm4.errors import UserError

DECISIONS = ("accept", "reject")
REVIEW_REJECTED = "human review: rejected"


def review_path(out: str | Path) -> Path:
    return Path(out).with_suffix(".review.jsonl")


def sampled_for_review(record_id: str, fraction: float, seed: int = 0) -> bool:
    digest = hashlib.sha256(f"{seed}:{record_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64 < fraction


class ReviewQueue:
    """Appends review entries for kept records; ids already queued (a resumed run) are not queued again."""

    def __init__(self, path: str | Path, fraction: float, seed: int = 0) -> None:
        if not 0.0 <= fraction <= 1.0:
            raise UserError(f"--review-fraction: must be in [0, 1], got {fraction}")
        self.path, self.fraction, self.seed = Path(path), fraction, seed
        self.queued = {e["id"] for e in load_records(self.path)}
        self._f = None

    def consider(self, record: dict) -> str | None:
        """Queue a kept record if it is borderline or sampled; why it was queued, or None."""
        if not record["kept"] or record["id"] in self.queued:
            return None
        borderline = record["meta"].get("borderline")
        if borderline:
            why = f"borderline: {borderline}"
        elif sampled_for_review(record["id"], self.fraction, self.seed):
            why = "sampled"
        else:
            return None
        entry = {"id": record["id"], "track": record["track"], "why": why, "messages": record["messages"]}
        if "tools" in record:
            entry["tools"] = record["tools"]
        entry.update(meta=record["meta"], decision="", note="")
        if self._f is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(self.path, "a", encoding="utf-8")
        self._f.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self._f.flush()
        self.queued.add(record["id"])
        return why

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def read_decisions(path: str | Path) -> dict[str, tuple[str, str]]:
    """id -> (decision, note) of a review file; a decision other than accept / reject / "" names its line."""
    from minicpm4.io import jsonl_records

    path = Path(path)
    if not path.is_file():
        raise UserError(f"--review {path}: no such file")
    decisions = {}
    for lineno, entry in jsonl_records(path):
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
            raise UserError(f"{path}:{lineno}: expected a review entry with a string 'id'")
        decision = str(entry.get("decision") or "").strip().lower()
        if decision not in ("", *DECISIONS):
            raise UserError(f"{path}:{lineno}: decision {entry.get('decision')!r}: expected 'accept', 'reject' or empty")
        decisions[entry["id"]] = (decision, str(entry.get("note") or "").strip())
    return decisions


def apply_review(out: str | Path, review: str | Path | None = None, kept_only: str | Path | None = None) -> dict:
    """Merge the review file's decisions into the output (atomically); counts of what changed."""
    out = Path(out)
    if not out.is_file():
        raise UserError(f"--out {out}: no such file")
    decisions = read_decisions(review or review_path(out))
    counts = {"accepted": 0, "rejected": 0, "pending": 0, "unmatched": 0}
    records = load_records(out, repair=False)
    by_id = {r["id"]: r for r in records}
    for rid, (decision, note) in decisions.items():
        r = by_id.get(rid)
        if r is None:
            counts["unmatched"] += 1
            continue
        if not decision:
            counts["pending"] += 1
        elif decision == "reject":
            r["kept"], r["reason"] = False, REVIEW_REJECTED + (f": {note}" if note else "")
            r["meta"]["review"] = "rejected"
            counts["rejected"] += 1
        else:
            if r["meta"].get("review") == "rejected":  # the reviewer changed their mind
                r["kept"], r["reason"] = True, ""
            r["meta"]["review"] = "accepted"
            counts["accepted"] += 1
    write_records_atomic(out, records)
    if kept_only is not None:
        counts["kept_exported"] = export_kept(out, kept_only)
    return counts
