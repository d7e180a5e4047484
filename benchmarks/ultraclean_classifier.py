"""UltraClean fastText quality classifier: held-out quality, keep rate per pool kind, single-core scoring speed, and
the datatrove pipeline end to end (MINICPM4.md §8.1).

    .venv/bin/python benchmarks/ultraclean_classifier.py [--repeats 3] [--max-docs N] [--shards 4]

Data (built on this machine, nothing downloaded): positives = the knowledge-dense sources (foldoc, jargon, wordnet)
of the pretraining corpus build/data/corpus/{train,val}.jsonl; the raw mixed-quality pool build/data/pool/pool.jsonl
split 80/20 by sha1(id) into train / held-out. Training follows the report: dim 256, lr 0.1, wordNgrams 3, minCount
5, 3 epochs (FastTextConfig defaults), the bundled default model's tokenizer, positives vs as many random negatives
from the pool's train split (balanced_negatives). The pool's train split is far smaller than the positives, so
positives are sampled down (seed 0) to its size: balanced 1:1.
Held-out: positives = corpus val foldoc/jargon/wordnet, negatives = held-out pool; precision / recall / F1 / accuracy
at threshold 0.5. The pool is not all low quality (man pages and HTML manuals are knowledge-dense), so the keep rate
per pool kind is the fairer picture; a length control re-scores every held-out pool document cut to its first
--control-chars characters (positives are short dictionary entries, pool documents are long files).
Speed: clf.scores over the held-out docs (preprocessing + tokenising + fastText predict) on one core (this process
pinned to one CPU with sched_setaffinity), and its split: fasttext_words() vs model.predict(); median of --repeats.
Pipeline: `minicpm4 data ultraclean pipeline` as a subprocess on the held-out pool written as --shards JSONL files,
--tasks 2 with --workers 1 and --workers 2, fresh output and logging dir each run; wall-clock docs/s (process start,
imports and model load included), median of --repeats. Writes benchmarks/results/ultraclean_classifier.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS_DIR, command_line, fmt, machine_info, median, publish  # noqa: E402

from minicpm4.data.ultraclean.classifier import (  # noqa: E402
    FastTextConfig, QualityClassifier, balanced_negatives, keep)
from minicpm4.data.ultraclean.preprocess import fasttext_words  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CORPUS, POOL = ROOT / "build/data/corpus", ROOT / "build/data/pool/pool.jsonl"
KNOWLEDGE = ("foldoc", "jargon", "wordnet")
THRESHOLD = 0.5


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def held_out(doc_id: str) -> bool:
    """Deterministic 80/20 split: the last 20 of 100 sha1 buckets are held out."""
    return int(hashlib.sha1(doc_id.encode()).hexdigest(), 16) % 100 >= 80


def capped(items: list, n: int | None, seed: int = 0) -> list:
    return items if n is None or len(items) <= n else random.Random(seed).sample(items, n)


def load_data(max_docs: int | None) -> dict:
    if not POOL.is_file() or not (CORPUS / "val.jsonl").is_file():
        raise SystemExit(f"missing {CORPUS}/{{train,val}}.jsonl or {POOL}: build the corpus and the pool first")
    corpus = {split: [r for r in read_jsonl(CORPUS / f"{split}.jsonl") if r["source"] in KNOWLEDGE]
              for split in ("train", "val")}
    pool = read_jsonl(POOL)
    pool_train = [r for r in pool if not held_out(r["id"])]
    pool_test = [r for r in pool if held_out(r["id"])]
    return {"pos_train": capped(corpus["train"], max_docs), "pos_test": capped(corpus["val"], max_docs),
            "pool_train": capped(pool_train, max_docs), "pool_test": capped(pool_test, max_docs),
            "pos_train_available": len(corpus["train"]), "pool_size": len(pool)}


def train(data: dict, tokenizer, cfg: FastTextConfig) -> tuple[QualityClassifier, dict]:
    pool_texts = [r["text"] for r in data["pool_train"]]
    # balanced 1:1 as the report does; the pool is the smaller side, so positives are sampled down to its size
    pos = [r["text"] for r in capped(data["pos_train"], len(pool_texts), cfg.seed)]
    neg = balanced_negatives(pool_texts, len(pos), cfg.seed, exclude=set(pos))
    t0 = time.perf_counter()
    clf = QualityClassifier.train(pos, neg, tokenizer, cfg)
    pos_set, neg_set = set(pos), set(neg)
    info = {"positives": len(pos), "negatives": len(neg), "seconds": time.perf_counter() - t0,
            "positives_by_source": dict(Counter(r["source"] for r in data["pos_train"] if r["text"] in pos_set)),
            "negatives_by_kind": dict(Counter(r["kind"] for r in data["pool_train"] if r["text"] in neg_set)),
            "config": cfg.__dict__, "threads": cfg.threads}
    return clf, info


def quality(clf: QualityClassifier, data: dict, control_chars: int) -> dict:
    pos, neg = data["pos_test"], data["pool_test"]
    pos_keep = keep(clf.scores(r["text"] for r in pos), THRESHOLD)
    neg_scores = clf.scores(r["text"] for r in neg)
    neg_keep = keep(neg_scores, THRESHOLD)
    cut_keep = keep(clf.scores(r["text"][:control_chars] for r in neg), THRESHOLD)
    tp, fn = sum(pos_keep), len(pos) - sum(pos_keep)
    fp, tn = sum(neg_keep), len(neg) - sum(neg_keep)
    precision = tp / (tp + fp) if tp + fp else float("nan")
    recall = tp / (tp + fn) if tp + fn else float("nan")
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else float("nan")
    by_source = defaultdict(list)
    for r, k in zip(pos, pos_keep):
        by_source[r["source"]].append(k)
    kinds = defaultdict(lambda: {"docs": 0, "kept": 0, "kept_cut": 0, "scores": [], "chars": []})
    for r, s, k, kc in zip(neg, neg_scores, neg_keep, cut_keep):
        d = kinds[r["kind"]]
        d["docs"] += 1
        d["kept"] += k
        d["kept_cut"] += kc
        d["scores"].append(s)
        d["chars"].append(len(r["text"]))
    per_kind = {kind: {"docs": d["docs"], "keep_rate": d["kept"] / d["docs"],
                       "keep_rate_first_chars": d["kept_cut"] / d["docs"],
                       "median_score": statistics.median(d["scores"]), "median_chars": statistics.median(d["chars"])}
                for kind, d in sorted(kinds.items(), key=lambda kv: -kv[1]["kept"] / kv[1]["docs"])}
    return {"threshold": THRESHOLD, "positives": len(pos), "negatives": len(neg), "tp": tp, "fp": fp, "tn": tn,
            "fn": fn, "precision": precision, "recall": recall, "f1": f1, "accuracy": (tp + tn) / (len(pos) + len(neg)),
            "recall_by_source": {s: sum(v) / len(v) for s, v in sorted(by_source.items())},
            "pool_keep_rate": sum(neg_keep) / len(neg), "pool_keep_rate_first_chars": sum(cut_keep) / len(neg),
            "control_chars": control_chars,
            "median_chars": {"positives": statistics.median(len(r["text"]) for r in pos),
                             "pool": statistics.median(len(r["text"]) for r in neg)},
            "pool_by_kind": per_kind}


def speed(clf: QualityClassifier, texts: list[str], repeats: int) -> dict:
    """Single-core scoring speed: this process pinned to one CPU (restored afterwards)."""
    affinity = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(affinity)})
    try:
        mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
        full, prep, predict = [], [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            clf.scores(texts)
            full.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            words = [fasttext_words(t, clf.tokenizer) for t in texts]
            prep.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            clf.model.predict(words, k=2)
            predict.append(time.perf_counter() - t0)
    finally:
        os.sched_setaffinity(0, affinity)
    n = len(texts)
    out = {"docs": n, "mb": mb, "cpus": 1}
    for name, times in (("scores", full), ("preprocess_tokenise", prep), ("predict", predict)):
        s = median(times)
        out[name] = {"seconds": s, "docs_per_s": n / s, "mb_per_s": mb / s, "runs": times}
    out["predict_share"] = out["predict"]["seconds"] / (out["predict"]["seconds"] + out["preprocess_tokenise"]["seconds"])
    return out


def scorer_seconds(stage_logs: Path) -> list[float]:
    """Per task: the QualityScorer step's time from datatrove's stats (model + tokenizer load included)."""
    out = []
    for f in sorted((stage_logs / "stats").glob("*.json")):
        steps = json.loads(f.read_text(encoding="utf-8"))
        out.append(sum(st["time_stats"]["total"] for st in steps if "ULTRACLEAN" in st.get("name", "")))
    return out


def pipeline(model: Path, records: list[dict], shards: int, repeats: int, workdir: Path) -> dict:
    inp = workdir / "input"
    inp.mkdir()
    for i in range(shards):
        with open(inp / f"part-{i:02d}.jsonl", "w", encoding="utf-8") as f:
            for r in records[i::shards]:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    mb = sum(len(r["text"].encode("utf-8")) for r in records) / 1e6
    exe = str(Path(sys.executable).with_name("minicpm4"))
    base = [exe, "data", "ultraclean", "pipeline", "--model", str(model), "--input", str(inp), "--tasks", "2"]
    out = {"input_files": shards, "docs": len(records), "mb": mb, "systems": {}}
    for workers in (1, 2):
        runs, task_s, kept = [], [], None
        for rep in range(repeats):
            run_dir = workdir / f"w{workers}-r{rep}"  # fresh output + logging dir: no task is skipped as done
            cmd = [*base, "--workers", str(workers), "--out", str(run_dir / "out"), "--logging-dir", str(run_dir / "logs")]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            runs.append(time.perf_counter() - t0)
            if proc.returncode != 0:
                raise SystemExit(f"pipeline failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
            kept = sum(1 for f in (run_dir / "out").glob("*.jsonl") for _ in open(f, encoding="utf-8"))
            task_s.append(scorer_seconds(run_dir / "logs" / "score"))
        s = median(runs)
        out["systems"][f"tasks2_workers{workers}"] = {"workers": workers, "tasks": 2, "seconds": s, "runs": runs,
                                                      "docs_per_s": len(records) / s, "mb_per_s": mb / s, "kept": kept,
                                                      "scorer_step_s_per_task": task_s}
        out["command_template"] = " ".join([*base, "--workers", "W", "--out", "OUT", "--logging-dir", "LOGS"])
    return out


def table(train_info: dict, q: dict, sp: dict, pl: dict, model_info: dict) -> str:
    lines = [f"Trained on {train_info['positives']} positives + {train_info['negatives']} negatives in "
             f"{train_info['seconds']:.1f}s ({train_info['threads']} fastText threads).", "",
             f"Held-out (threshold {THRESHOLD}): {q['positives']} positives (corpus val foldoc/jargon/wordnet) vs "
             f"{q['negatives']} pool docs",
             "| precision | recall | F1 | accuracy | pool keep rate | pool keep rate, first "
             f"{q['control_chars']} chars |", "|---|---|---|---|---|---|",
             f"| {q['precision']:.3f} | {q['recall']:.3f} | {q['f1']:.3f} | {q['accuracy']:.3f} | "
             f"{q['pool_keep_rate']:.3f} | {q['pool_keep_rate_first_chars']:.3f} |", "",
             "Recall by source: " + ", ".join(f"{s} {v:.3f}" for s, v in q["recall_by_source"].items()), "",
             f"| pool kind | docs | keep rate | keep rate, first {q['control_chars']} chars | median score | "
             "median chars |", "|---|---|---|---|---|---|"]
    for kind, d in q["pool_by_kind"].items():
        lines.append(f"| {kind} | {d['docs']} | {d['keep_rate']:.3f} | {d['keep_rate_first_chars']:.3f} | "
                     f"{d['median_score']:.3f} | {d['median_chars']:,.0f} |")
    lines += ["", f"Scoring speed, 1 core, {sp['docs']} held-out docs ({sp['mb']:.1f} MB), median of "
              f"{len(sp['scores']['runs'])}", "| stage | seconds | docs/s | MB/s |", "|---|---|---|---|"]
    for name, label in (("scores", "clf.scores (all)"), ("preprocess_tokenise", "preprocess + tokenise"),
                        ("predict", "fastText predict")):
        d = sp[name]
        lines.append(f"| {label} | {d['seconds']:.2f} | {fmt(d['docs_per_s'], 0)} | {d['mb_per_s']:.2f} |")
    lines += ["", f"datatrove pipeline end to end (CLI wall clock), {pl['docs']} held-out pool docs "
              f"({pl['mb']:.1f} MB) in {pl['input_files']} files, median of {len(next(iter(pl['systems'].values()))['runs'])}",
              "| run | seconds | docs/s | MB/s | kept | scorer step per task, s | vs 1-core clf.scores |",
              "|---|---|---|---|---|---|---|"]
    ref = sp["scores"]["docs_per_s"]
    for d in pl["systems"].values():
        per_task = [median(col) for col in zip(*d["scorer_step_s_per_task"])]
        lines.append(f"| --tasks 2 --workers {d['workers']} | {d['seconds']:.2f} | {fmt(d['docs_per_s'], 0)} | "
                     f"{d['mb_per_s']:.2f} | {d['kept']} | {' / '.join(f'{t:.1f}' for t in per_task)} | "
                     f"{d['docs_per_s'] / ref:.2f}x |")
    lines.append(f"fastText model file {model_info['bytes'] / 1e9:.2f} GB, load {model_info['load_seconds']:.1f}s (median) "
                 "(each pipeline task loads it; the scorer step's time includes that load)")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-docs", type=int, default=None, help="cap each document set (quick run)")
    ap.add_argument("--shards", type=int, default=4, help="JSONL files the held-out pool is written as")
    ap.add_argument("--control-chars", type=int, default=512)
    ap.add_argument("--out", default=str(RESULTS_DIR / "ultraclean_classifier.json"))
    args = ap.parse_args()

    from minicpm4.api import DEFAULT_MODEL_DIR
    from minicpm4.tokenizer import Tokenizer

    t_start = time.perf_counter()
    tokenizer = Tokenizer.from_pretrained(DEFAULT_MODEL_DIR)
    data = load_data(args.max_docs)
    cfg = FastTextConfig(threads=min(FastTextConfig().threads, os.cpu_count() or 1))
    clf, train_info = train(data, tokenizer, cfg)
    print(f"trained: {train_info['positives']} + {train_info['negatives']} docs in {train_info['seconds']:.1f}s",
          flush=True)
    q = quality(clf, data, args.control_chars)
    print(f"held-out: F1 {q['f1']:.3f}, pool keep rate {q['pool_keep_rate']:.3f}", flush=True)
    test_texts = [r["text"] for r in data["pos_test"]] + [r["text"] for r in data["pool_test"]]
    sp = speed(clf, test_texts, args.repeats)
    print(f"speed: {sp['scores']['docs_per_s']:,.0f} docs/s on 1 core", flush=True)
    with tempfile.TemporaryDirectory(prefix="ultraclean-bench-") as tmp:
        model = Path(tmp) / "quality.bin"
        clf.save(model)
        loads = []
        for _ in range(args.repeats):  # what each pipeline task does first (file in the page cache)
            t0 = time.perf_counter()
            QualityClassifier.load(model, tokenizer)
            loads.append(time.perf_counter() - t0)
        model_info = {"bytes": model.stat().st_size, "load_seconds": median(loads), "load_runs": loads}
        pl = pipeline(model, data["pool_test"], args.shards, args.repeats, Path(tmp))
    result = {"command": command_line(), "machine": machine_info(), "total_seconds": time.perf_counter() - t_start,
              "data": {"corpus": str(CORPUS.relative_to(ROOT)), "pool": str(POOL.relative_to(ROOT)),
                       "knowledge_sources": list(KNOWLEDGE), "pool_size": data["pool_size"],
                       "pool_split": "sha1(id) % 100 >= 80 held out",
                       "pool_train": len(data["pool_train"]), "pool_held_out": len(data["pool_test"]),
                       "positives_train_available": data["pos_train_available"],
                       "positives_held_out": len(data["pos_test"]), "max_docs": args.max_docs},
              "tokenizer": str(DEFAULT_MODEL_DIR.relative_to(ROOT)), "train": train_info, "quality": q,
              "model_file": model_info, "speed_1core": sp, "pipeline": pl}
    result["table"] = table(train_info, q, sp, pl, model_info)
    result["total_seconds"] = time.perf_counter() - t_start
    publish(result, args.out)


if __name__ == "__main__":
    main()
