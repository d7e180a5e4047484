"""UltraClean verification: annealing from a stable-phase checkpoint on candidate + default mix vs the default mix
alone, on a tiny model (minicpm4/data/ultraclean/verify.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from minicpm4.config import tiny
from minicpm4.data.ultraclean.verify import (AnnealConfig, EvalSets, StableCheckpoint, Verifier, markdown_table,
                                             metric_gain)
from minicpm4.errors import UserError
from minicpm4.train.data import EpochSampler, MixtureWindows, TokenWindows
from minicpm4.train.trainer import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, SEQ = 64, 32


def noise(n: int, seed: int) -> np.ndarray:
    """The 'default mix': documents of uniformly random tokens (BOS=1 every 64 tokens)."""
    t = np.random.default_rng(seed).integers(3, VOCAB, n).astype(np.int64)
    t[::64] = 1
    return t


def pattern(n: int, seed: int) -> np.ndarray:
    """'Knowledge-dense' text: a deterministic rule (next = prev + 7 mod 61, +3) the model can learn."""
    start = int(np.random.default_rng(seed).integers(0, 61))
    t = (start + 7 * np.arange(n)) % 61 + 3
    t[::64] = 1
    return t.astype(np.int64)


@pytest.fixture(scope="module")
def stable(tmp_path_factory) -> StableCheckpoint:
    """12 steps of a run that would decay only after step 100: a stable-phase checkpoint."""
    out = tmp_path_factory.mktemp("stable")
    cfg = TrainConfig(out_dir=str(out), steps=12, micro_batch_size=4, seq_len=SEQ, lr=1e-2, warmup_steps=2,
                      progress=False, dtype="float32", save_every=12)
    train(tiny(vocab_size=VOCAB), cfg, TokenWindows(noise(40_000, 0), SEQ, 1))
    state = json.loads((out / "checkpoints" / "step_00000012" / "train_state.json").read_text())
    state["train_config"]["steps"], state["train_config"]["decay_steps"] = 100, 20  # as if cut from a longer run
    (out / "checkpoints" / "step_00000012" / "train_state.json").write_text(json.dumps(state))
    return StableCheckpoint.open(out)


def test_mixture_windows_fractions_and_determinism():
    a, b = TokenWindows(noise(5000, 1), 16, 1), TokenWindows(pattern(700, 0), 16, 1)
    mix = MixtureWindows([b, a], [0.3, 0.7], seed=3)
    assert len(mix) == round(len(a) / 0.7)
    streams = [mix.locate(i)[0] for i in range(len(mix))]
    assert streams.count(0) == round(0.3 * len(mix))
    assert [mix.locate(i) for i in range(len(mix))] == [MixtureWindows([b, a], [0.3, 0.7], seed=3).locate(i)
                                                        for i in range(len(mix))]
    sampler = EpochSampler(len(mix), 0)
    share = mix.fraction_of(0, [sampler(g) for g in range(len(mix) * 4)])
    assert share == pytest.approx(0.3, abs=0.01)  # whole epochs: exact up to rounding of the block
    item = next(i for i in range(len(mix)) if mix.locate(i)[0] == 0)
    w = mix.locate(item)[1]
    assert mix.batch([item]).input_ids.tolist() == b.batch([w]).input_ids.tolist()
    with pytest.raises(ValueError, match="sum to 1"):
        MixtureWindows([a, b], [0.5, 0.6])


def test_stable_checkpoint_must_be_before_the_decay(stable, tmp_path):
    assert stable.state.step == 12
    with pytest.raises(UserError, match="not a training checkpoint"):
        StableCheckpoint.open(tmp_path)
    decayed = tmp_path / "ckpt"
    decayed.mkdir()
    state = json.loads((stable.path / "train_state.json").read_text())
    state["train_config"]["steps"], state["train_config"]["decay_steps"] = 14, 4
    (decayed / "train_state.json").write_text(json.dumps(state))
    with pytest.raises(UserError, match="decay phase"):
        StableCheckpoint.open(decayed)


def test_anneal_comparison_end_to_end(stable, tmp_path):
    """Both arms: same tokens and LR schedule; the candidate that matches the held-out text wins beyond noise;
    a candidate like the default mix does not; a second call reuses every cached arm."""
    cfg = AnnealConfig(steps=14, seeds=(0, 1, 2), eval_tokens=4096)
    evals = EvalSets({"knowledge": pattern(4096, 99), "default_val": noise(4096, 98)})
    verifier = Verifier(stable, noise(40_000, 0), evals, cfg, tmp_path, bos_token_id=1)
    good = verifier.compare("pattern", pattern(6000, 5), documents=3)
    arms = tmp_path / "arms"
    default0 = json.loads((arms / "default-seed0" / "result.json").read_text())
    cand0 = json.loads((arms / "pattern-seed0" / "result.json").read_text())
    assert default0["tokens"] == cand0["tokens"] == 14 * 4 * SEQ == good.tokens
    assert default0["lr"] == cand0["lr"] and len(cand0["lr"]) == 14
    assert cand0["lr"][0] < 1e-2 and cand0["lr"][-1] == pytest.approx(1e-3, rel=1e-6)  # decays to min_lr_ratio
    assert all(x >= y for x, y in zip(cand0["lr"], cand0["lr"][1:]))
    assert 0.15 < good.candidate_share < 0.45
    assert not (arms / "pattern-seed0" / "checkpoints").exists()  # dropped once evaluated
    k = good.metrics["loss/knowledge"]
    assert len(k.default) == len(k.candidate) == 3
    assert k.gain > 0.1 and good.verified  # the rule is learnable in 14 steps at 30% (measured: ~0.2)

    same = verifier.compare("morenoise", noise(20_000, 7))
    assert not same.verified and abs(same.metrics["loss/knowledge"].gain) < 0.3 * k.gain

    mtime = (arms / "default-seed1" / "result.json").stat().st_mtime_ns
    again = verifier.compare("pattern", pattern(6000, 5))
    assert again.metrics["loss/knowledge"].candidate == k.candidate
    assert (arms / "default-seed1" / "result.json").stat().st_mtime_ns == mtime
    renamed = verifier.compare("pattern", noise(20_000, 7))  # another set under a cached name: run again
    assert renamed.metrics["loss/knowledge"].candidate == same.metrics["loss/knowledge"].candidate
    table = markdown_table([good, same], evals.metric_names)
    assert "| +pattern |" in table and "| default mix |" in table and "yes" in table


def test_gain_statistics():
    g = metric_gain([3.0, 3.1, 2.9], [2.5, 2.6, 2.4], 2.0)
    assert g.gain == pytest.approx(0.5) and g.stderr == pytest.approx(0.0, abs=1e-12) and g.significant
    g = metric_gain([3.0, 3.0], [2.9, 3.2], 2.0)
    assert g.gain == pytest.approx(-0.05) and not g.significant
    one = metric_gain([3.0], [2.0], 2.0)
    assert np.isnan(one.stderr) and not one.significant  # one seed: no noise estimate, never "verified"


def test_bad_inputs(stable, tmp_path):
    with pytest.raises(UserError, match="fraction"):
        AnnealConfig(candidate_fraction=1.0)
    with pytest.raises(UserError, match="primary"):
        EvalSets({"a": noise(100, 0)}, primary="loss/b")
    v = Verifier(stable, noise(10_000, 0), EvalSets({"a": noise(2000, 0)}), AnnealConfig(steps=1, seeds=(0,)), tmp_path)
    with pytest.raises(UserError, match="fewer than"):
        v.compare("tiny", np.arange(10))
    with pytest.raises(UserError, match="name"):
        v.compare("default", noise(1000, 0))


class WordTokenizer:
    """'w17 w24 ...' <-> [17, 24, ...]: lets the fastText classifier and the tiny model read the same ids."""

    def encode(self, text: str, add_bos: bool = False, allow_special: bool = False) -> list[int]:
        return [int(w[1:]) for w in text.split() if w[1:].isdigit()]


def as_text(ids: np.ndarray) -> str:
    return " ".join(f"w{i}" for i in ids)


def encode_docs(texts: list[str]) -> np.ndarray:
    tok = WordTokenizer()
    return np.concatenate([np.array([1] + tok.encode(t) + [2], dtype=np.int64) for t in texts])


def test_loop_verifies_seeds_trains_filters_and_iterates(stable, tmp_path):
    pytest.importorskip("fasttext", reason="the loop trains the fastText classifier")
    from minicpm4.data.ultraclean.classifier import FastTextConfig
    from minicpm4.data.ultraclean.loop import LoopConfig, run_loop

    # fastText needs a few hundred examples to move off 0.5 (it makes one update per line)
    dense = [as_text(pattern(41, s)[1:]) for s in range(400)]
    sparse = [as_text(noise(41, 1000 + s)[1:]) for s in range(400)]
    pool = [d for pair in zip(dense[200:], sparse[200:]) for d in pair]  # half dense, half noise
    cfg = AnnealConfig(steps=10, seeds=(0, 1), eval_tokens=4096)
    verifier = Verifier(stable, noise(40_000, 0), EvalSets({"knowledge": pattern(4096, 99)}), cfg, tmp_path, 1)
    lines: list[str] = []
    report = run_loop(verifier, encode_docs, {"dense": dense[:200], "noise": sparse[:200]}, pool, WordTokenizer(),
                      LoopConfig(rounds=2, fasttext=FastTextConfig(min_count=1, epoch=25, threads=1)), tmp_path,
                      log=lines.append)
    by_name = {c.name: c for c in report.seeds}
    assert by_name["dense"].verified and not by_name["noise"].verified
    assert report.unfiltered is not None
    first = report.rounds[0]
    assert (first.positives, first.negatives) == (200, 200)  # only the verified seed set, balanced negatives
    assert first.kept == pytest.approx(200, abs=10)  # the dense half of the pool
    gain = lambda c: c.metrics["loss/knowledge"].gain  # noqa: E731
    assert first.stable and gain(first.comparison) > gain(report.unfiltered)  # filtered beats unfiltered
    second = report.rounds[1]
    assert second.positives == 200 + first.kept  # labelled by the round-1 classifier
    assert second.agreement is not None and second.agreement > 0.8
    assert report.chosen_round in (1, 2) and Path(second.classifier).is_file()
    assert any("round 2" in line for line in lines)
    assert json.loads(json.dumps(report.to_dict()))["rounds"][0]["comparison"]["verified"]


def test_no_verified_seed_stops_the_loop(stable, tmp_path):
    pytest.importorskip("fasttext")
    from minicpm4.data.ultraclean.classifier import FastTextConfig
    from minicpm4.data.ultraclean.loop import LoopConfig, run_loop

    cfg = AnnealConfig(steps=3, seeds=(0, 1), eval_tokens=2048)
    verifier = Verifier(stable, noise(40_000, 0), EvalSets({"knowledge": pattern(2048, 99)}), cfg, tmp_path, 1)
    sparse = [as_text(noise(120, 1000 + s)[1:]) for s in range(10)]
    report = run_loop(verifier, encode_docs, {"noise": sparse}, sparse, WordTokenizer(), LoopConfig(), tmp_path,
                      log=lambda s: None)
    assert not report.seeds[0].verified and report.rounds == [] and report.chosen_round is None


def test_verify_and_iterate_cli_end_to_end(tmp_path, capsys):
    """The commands on real text: shards from JSONL with the bundled tokenizer, a stable run of a tiny model,
    two candidates, a held-out text and the definitions QA rows; then one round of the loop."""
    pytest.importorskip("fasttext")
    from minicpm4.api import DEFAULT_MODEL_DIR
    from minicpm4.cli import main
    from minicpm4.data.shards import write_shards

    root = Path(__file__).resolve().parents[1]
    kb = [json.loads(line) for line in (root / "minicpm4/assets/survey-kb/kb.jsonl").read_text().splitlines()]
    changelog = [json.loads(line)["text"] for line in (root / "tests/fixtures/ultraclean_pool.jsonl").read_text().splitlines()]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for split, texts in (("train", changelog[:300]), ("val", changelog[300:])):
        (corpus / f"{split}.jsonl").write_text("".join(json.dumps({"source": "changelog", "title": str(i), "text": t}) + "\n"
                                                       for i, t in enumerate(texts)))
    write_shards(corpus, DEFAULT_MODEL_DIR, tmp_path / "shards", show_progress=False)
    write = lambda name, texts: (tmp_path / name).write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))  # noqa: E731
    write("kb.jsonl", [e["abstract"] for e in kb[100:400]])
    write("knowledge.jsonl", [e["abstract"] for e in kb[:100]])
    write("changelog.jsonl", changelog[:150])
    write("pool.jsonl", [e["abstract"] for e in kb[400:600]] + changelog[150:350])
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Define {e['title']}."},
                                                       {"role": "assistant", "content": e["abstract"][:200]}],
                                          "task": "definition"}) + "\n" for e in kb[:20]))
    from minicpm4.train.trainer import TrainConfig, train
    stable = tmp_path / "stable"
    windows = TokenWindows.from_folder(tmp_path / "shards", "train", SEQ)
    train(tiny(vocab_size=8192), TrainConfig(out_dir=str(stable), steps=3, micro_batch_size=4, seq_len=SEQ,
                                             progress=False, dtype="float32"), windows)
    common = ["--stable", str(stable), "--default-data", str(tmp_path / "shards"), "--eval-text",
              f"knowledge={tmp_path / 'knowledge.jsonl'}", "--heldout", str(heldout), "--steps", "2", "--seeds", "0,1",
              "--eval-tokens", "1024"]
    main(["data", "ultraclean", "verify", "--candidate", f"kb={tmp_path / 'kb.jsonl'}", "--candidate",
          f"changelog={tmp_path / 'changelog.jsonl'}", "--candidate", f"shards={tmp_path / 'shards'}", *common,
          "--out", str(tmp_path / "verify")])
    report = json.loads((tmp_path / "verify" / "report.json").read_text())
    assert [c["name"] for c in report["comparisons"]] == ["kb", "changelog", "shards"]
    assert report["comparisons"][2]["candidate_documents"] == 300  # a shards folder: its train split
    metrics = report["comparisons"][0]["metrics"]
    assert set(metrics) == {"loss/knowledge", "loss/default_val", "answer_nll"}
    assert all(len(m["default"]) == len(m["candidate"]) == 2 for m in metrics.values())
    assert report["comparisons"][0]["tokens"] == 2 * 4 * SEQ and report["stable_step"] == 3
    assert "| +kb |" in (tmp_path / "verify" / "report.md").read_text()
    assert "| +changelog |" in capsys.readouterr().out

    main(["data", "ultraclean", "iterate", "--seed-set", f"kb={tmp_path / 'kb.jsonl'}", "--pool",
          str(tmp_path / "pool.jsonl"), "--rounds", "1", *common, "--min-gain", "-1", "--out", str(tmp_path / "loop")])
    loop = json.loads((tmp_path / "loop" / "report.json").read_text())
    assert loop["seeds"][0]["verified"]  # min gain -1 with 2 seeds: verified unless the gain is far below noise
    assert loop["unfiltered"]["name"] == "pool" and len(loop["rounds"]) == 1
    assert Path(loop["rounds"][0]["classifier"]).is_file()

    assert main(["data", "ultraclean", "verify", "--candidate", "nameless", *common, "--out", str(tmp_path / "x")]) == 2
    assert "--candidate 'nameless': expected NAME=PATH" in capsys.readouterr().err
