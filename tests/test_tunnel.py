"""ModelTunnel (minicpm4.train.tunnel): the ScalingBench-style indicator against a hand-computed conditional
NLL, the optimum / transfer logic, a micro sweep that trains through trainer.train, and the CLI."""

from __future__ import annotations

import argparse
import json
import math
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

from minicpm4.config import tiny
from minicpm4.data.tokenizer_train import train_tokenizer
from minicpm4.errors import UserError
from minicpm4.tokenizer import Tokenizer
from minicpm4.train import tunnel_cli
from minicpm4.train.data import SyntheticTokens
from minicpm4.attention.document_mask import enable_document_mask
from minicpm4.train.sft_data import PackedConversations
from minicpm4.train.trainer import TrainConfig, build_train_module
from minicpm4.train.tunnel import (RunResult, SweepConfig, SweepPoint, SweepReport, TunnelData, curves, find_optima,
                                   lr_optimum, mean_nll, run_sweep, scalingbench_set, transfer, write_report)

CONVERSATIONS = [
    [{"role": "user", "content": "What is the meaning of the word apple?"},
     {"role": "assistant", "content": "apple (noun): a round fruit of a tree."}],
    [{"role": "user", "content": "Give me a synonym of \"big\"."},
     {"role": "assistant", "content": "big can be replaced by: large, great."}],
    [{"role": "user", "content": "Use the word \"tree\" in a sentence."},
     {"role": "assistant", "content": "\"a tall tree\" (here tree is a noun meaning: a woody plant)."}],
]
VOCAB = 320  # >= the test tokenizer's 300 ids


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A 300-token ChatML byte-level BPE tokenizer, trained the project's way (minicpm4.data.tokenizer_train)."""
    root = tmp_path_factory.mktemp("tok")
    (root / "corpus").mkdir()
    texts = [m["content"] for c in CONVERSATIONS for m in c] * 4
    with (root / "corpus" / "train.jsonl").open("w", encoding="utf-8") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"source": "test", "title": str(i), "text": text}) + "\n")
    return train_tokenizer(root / "corpus", root / "tokenizer", vocab_size=300, show_progress=False)


# ---- the indicator -----------------------------------------------------------------------------------

def test_indicator_equals_hand_computed_conditional_nll(tokenizer_dir):
    tok = Tokenizer.from_pretrained(tokenizer_dir)
    module = build_train_module(tiny(vocab_size=VOCAB), TrainConfig(dtype="float32", seed=3))
    enable_document_mask(module.model)
    packed = scalingbench_set(CONVERSATIONS[:2], tok, seq_len=256)
    assert len(packed) == 1  # both conversations share one row: only the document mask keeps them apart
    got = mean_nll(module, packed, [0], batch_size=4)

    # by hand: NLL of each answer token given everything before it in its own conversation, token-weighted
    im_end = tok.token_to_id("<|im_end|>")
    total, count = 0.0, 0
    for conv in CONVERSATIONS[:2]:
        prompt = tok.encode_chat(conv[:1], add_generation_prompt=True)  # ... "<|im_start|>assistant\n"
        full = tok.encode_chat(conv, add_generation_prompt=False)
        assert full[:len(prompt)] == prompt and max(full) < VOCAB
        stop = full.index(im_end, len(prompt))
        assert tok.decode(full[len(prompt):stop]) == conv[1]["content"]  # exactly the answer
        with torch.no_grad():
            logits = module.model.logits(module.model.hidden_states(torch.tensor([full])))
        logp = torch.log_softmax(logits.double(), dim=-1)[0]
        total -= sum(float(logp[t - 1, full[t]]) for t in range(len(prompt), stop))
        count += stop - len(prompt)
    assert packed.stats.trained_tokens == count
    assert got == pytest.approx(total / count, rel=1e-5)

    with_end = scalingbench_set(CONVERSATIONS[:2], tok, seq_len=256, score_im_end=True)
    assert with_end.stats.trained_tokens == count + 2  # + each closing <|im_end|> (the SFT mask's rule)
    subset = scalingbench_set(CONVERSATIONS, tok, seq_len=256, limit=2, seed=1)
    assert subset.stats.conversations == 2


# ---- optimum and transfer logic -----------------------------------------------------------------------

def test_lr_optimum_argmin_and_parabola_fit():
    xs = [-6, -5, -4, -3, -2]
    lrs = [2.0**x for x in xs]
    i, fit = lr_optimum(lrs, [(x + 3.7) ** 2 + 5 for x in xs])  # vertex at log2 LR = -3.7
    assert lrs[i] == 2.0**-4 and math.log2(fit) == pytest.approx(-3.7)
    assert lr_optimum(lrs, [5, 4, 3, 2, 1]) == (4, None)  # at the edge: no fit
    nan = float("nan")
    assert lr_optimum(lrs, [3, 2, nan, 1e9, nan])[0] == 1  # diverged runs never win
    assert lr_optimum(lrs, [3, nan, 2, 4, 5]) == (2, None)  # a diverged neighbour: no fit
    assert lr_optimum(lrs, [nan] * 5) == (None, None)


def fake(p: str, width: int, log2_lr: float, loss: float, seed: int = 0) -> RunResult:
    return RunResult(SweepPoint(p, width, 0.1, 8, seed, 2.0**log2_lr), loss, loss + 1.0, loss, 1000 * width, 0.1)


def synthetic_report() -> SweepReport:
    """muP optimum at 2^-6 at every width; SP's halves with every doubling (2^-5 at 64 -> 2^-7 at 256)."""
    grid = range(-9, -1)
    results = [fake("mup", w, x, 3 + 0.1 * (x + 6) ** 2) for w in (64, 128, 256) for x in grid]
    results += [fake("standard", w, x, 3 + 0.1 * (x + 5 + math.log2(w / 64)) ** 2) for w in (64, 128, 256) for x in grid]
    results[-1].val_loss = float("nan")  # a diverged run
    sweep = SweepConfig(lrs=tuple(2.0**x for x in grid))
    return SweepReport(sweep, results, command="minicpm4 tunnel --synthetic")


def test_optima_and_transfer_on_known_curves(tmp_path):
    report = synthetic_report()
    optima = {(o.parametrization, o.width): o for o in find_optima(report.results, "val_loss")}
    assert [round(optima[("mup", w)].log2_lr, 6) for w in (64, 128, 256)] == [-6, -6, -6]
    assert [optima[("standard", w)].lr for w in (64, 128, 256)] == [2.0**-5, 2.0**-6, 2.0**-7]
    rows = {(t["parametrization"], t["metric"]): t for t in transfer(find_optima(report.results, "val_loss"))}
    assert rows[("mup", "val_loss")]["slope"] == pytest.approx(0) and rows[("mup", "val_loss")]["spread_octaves"] == 0
    assert rows[("standard", "val_loss")]["slope"] == pytest.approx(-1)
    assert rows[("standard", "val_loss")]["spread_octaves"] == pytest.approx(2)

    # seeds average; one diverged seed makes the point diverged
    two_seeds = [fake("mup", 64, -6, 3.0), fake("mup", 64, -6, 4.0, seed=1), fake("mup", 64, -5, 2.0),
                 fake("mup", 64, -5, float("nan"), seed=1)]
    (lrs, ys), = curves(two_seeds, "val_loss").values()
    assert lrs == [2.0**-6, 2.0**-5] and ys[0] == 3.5 and math.isnan(ys[1])

    files = write_report(report, tmp_path)  # plot + table cope with a diverged run, no training needed
    table = files["table"].read_text()
    assert "minicpm4 tunnel --synthetic" in table and "div." in table and "| standard (SP) | 256 |" in table
    assert files["plot"].stat().st_size > 10_000


# ---- a micro sweep through trainer.train -------------------------------------------------------------

def synthetic_data(seq_len: int = 32) -> TunnelData:
    rng = np.random.default_rng(0)
    examples = []
    for _ in range(6):  # "prompt" then "answer": flags on the answer only
        n = int(rng.integers(10, 20))
        examples.append(([1] + rng.integers(3, 256, size=n).tolist(), [False] * (n // 2 + 1) + [True] * (n - n // 2)))
    sb = PackedConversations.build(examples, 48, pad_id=0)
    return TunnelData(SyntheticTokens(256, seq_len, num_tokens=20_000, seed=1),
                      SyntheticTokens(256, seq_len, num_tokens=4_000, seed=2), sb, 256, source={"test": "synthetic"})


def test_micro_sweep_runs_and_writes_table_plot_json(tmp_path):
    sweep = SweepConfig(widths=(32, 64), lrs=(2.0**-7, 2.0**-3), parametrizations=("mup", "standard"),
                        batch_sizes=(2,), steps=3, seq_len=32, head_dim=16, dim_model_base=32, val_windows=4,
                        sb_seq_len=48, eval_batch_size=4)
    logs: list[str] = []
    report = run_sweep(sweep, synthetic_data(), tmp_path, command="test", log=logs.append)
    assert len(report.results) == 8 and len(logs) == 8
    assert all(math.isfinite(r.val_loss) and math.isfinite(r.sb_loss) and len(r.losses) == 3 for r in report.results)
    # muP and SP proxies of a width have the same parameters but train differently
    by = {(r.point.parametrization, r.point.width, r.point.lr): r for r in report.results}
    assert by[("mup", 64, 2.0**-3)].parameters == by[("standard", 64, 2.0**-3)].parameters
    assert by[("mup", 64, 2.0**-3)].val_loss != by[("standard", 64, 2.0**-3)].val_loss

    saved = json.loads((tmp_path / "results.json").read_text())
    assert len(saved["runs"]) == 8 and saved["command"] == "test"
    assert {(o["parametrization"], o["width"], o["metric"]) for o in saved["optima"]} == \
        {(p, w, m) for p in ("mup", "standard") for w in (32, 64) for m in ("val_loss", "sb_loss")}
    assert all(o["lr"] in sweep.lrs for o in saved["optima"])
    assert "| muP | 64 | 2 |" in (tmp_path / "tunnel.md").read_text()
    assert (tmp_path / "tunnel.png").stat().st_size > 10_000

    logs.clear()  # the same command again reuses every finished run
    again = run_sweep(sweep, synthetic_data(), tmp_path, log=logs.append)
    assert logs == [f"tunnel: reusing 8 finished runs from {tmp_path / 'runs.jsonl'}"]
    assert [r.val_loss for r in again.results] == [r.val_loss for r in report.results]


# ---- CLI ---------------------------------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="minicpm4")
    tunnel_cli.register(p.add_subparsers(dest="command"))
    return p


def test_cli_help_and_flag_errors(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        parser().parse_args(["tunnel", "--help"])
    assert e.value.code == 0 and "--init-scales" in capsys.readouterr().out
    assert tunnel_cli.parse_lrs("2^-3..2^-1,0.5") == (0.125, 0.25, 0.5)
    assert tunnel_cli.parse_lrs("2^-2..2^-1:0.5") == pytest.approx((2**-2, 2**-1.5, 2**-1))
    for bad in ("2^-1..2^-3", "fast", "-0.1"):
        with pytest.raises(UserError, match="--lrs"):
            tunnel_cli.parse_lrs(bad)
    assert tunnel_cli.main(["--data", str(tmp_path), "--sft-heldout", "x.jsonl", "--out", str(tmp_path),
                            "--widths", "48", "--head-dim", "32"]) == 2
    assert "widths: 48 is not a positive multiple of head_dim 32" in capsys.readouterr().err


def test_cli_end_to_end(tokenizer_dir, tmp_path, capsys):
    shards = tmp_path / "shards"
    shards.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 12_000), ("val", 3_000)):
        tokens = rng.integers(11, 300, size=n).astype(np.uint16)
        tokens[::50] = 1
        tokens.tofile(shards / f"{split}.bin")
    (shards / "meta.json").write_text(json.dumps({"dtype": "uint16", "vocab_size": VOCAB, "bos_token_id": 1,
                                                  "eos_token_id": 2, "tokenizer": str(tokenizer_dir)}))
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text("".join(json.dumps({"messages": c, "task": "t", "key": str(i)}) + "\n"
                               for i, c in enumerate(CONVERSATIONS)))
    out = tmp_path / "out"
    args = parser().parse_args(["tunnel", "--data", str(shards), "--sft-heldout", str(heldout), "--out", str(out),
                                "--widths", "32", "--lrs", "2^-6..2^-5", "--parametrizations", "mup",
                                "--steps", "2", "--batch-sizes", "2", "--seq-len", "32", "--head-dim", "16",
                                "--dim-model-base", "32", "--val-windows", "2", "--threads", "1"])
    args.func(args)
    captured = capsys.readouterr()
    assert "LR optimum per width" in captured.out and "[2/2] mup w=32" in captured.err
    saved = json.loads((out / "results.json").read_text())
    command = shlex.split(saved["command"])
    assert command[command.index("tunnel") - 1:][:3] == ["minicpm4", "tunnel", "--data"]  # after `nice -n N`, if any
    assert command[command.index("--lrs") + 1] == "2^-6..2^-5"
    assert saved["data"]["sb_targets"] > 0 and len(saved["runs"]) == 2
    assert (out / "tunnel.png").is_file() and (out / "tunnel.md").is_file()
