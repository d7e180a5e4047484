"""Draft training (minicpm4/train/draft.py, `minicpm4 train draft`): learning, the unrolled step's attention,
resume, export round trip, MTP conversion, the command line. Tiny targets built here, one CPU thread."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from minicpm4.attention.dense import DenseAttention
from minicpm4.attention.metadata import AttentionMetadata
from minicpm4.cli import build_parser, main
from minicpm4.config import tiny
from minicpm4.model import build_model
from minicpm4.mtp import MTPHead
from minicpm4.speculative.draft_model import draft_from_mtp, load_draft
from minicpm4.train import mup
from minicpm4.train.data import Batch, TokenWindows
from minicpm4.train.draft import (DraftTrainConfig, draft_forward, draft_steps, evaluate_draft, initial_draft,
                                  load_mtp_head, load_target, train_draft)
from minicpm4.train.metrics import read_metrics
from tests.test_train import write_shards as train_shards

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB = 128


def write_shards(folder: Path, num_docs: int = 300, seed: int = 0) -> Path:
    """Documents that count upwards from a random start: a target trained on them is predictable."""
    return train_shards(folder, num_docs, seed, vocab=VOCAB, modulus=VOCAB - 3, max_start=100, max_len=60)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(shard folder, target model folder): a tiny target pretrained 25 steps on the counting corpus, with its
    MTP head (mtp_head.safetensors) and the run's checkpoint."""
    from minicpm4.train.trainer import TrainConfig, export_final, train

    root = tmp_path_factory.mktemp("draft")
    shards = write_shards(root / "shards")
    cfg = TrainConfig(out_dir=str(root / "pre"), steps=25, micro_batch_size=8, seq_len=64, lr=1e-2, warmup_steps=2,
                      dtype="float32", mtp_weight=0.3, peak_flops=1e11, progress=False, parallel="none")
    result = train(tiny(vocab_size=VOCAB, eos_token_id=2), cfg, TokenWindows.from_folder(shards, "train", 64))
    export_final(result, root / "pre" / "final")
    return shards, root / "pre" / "final"


def base_cfg(setup, out: Path, **kw) -> DraftTrainConfig:
    shards, model = setup
    cfg = dict(model=str(model), data=str(shards), out_dir=str(out), steps=30, micro_batch_size=4, seq_len=48,
               lr=1e-2, warmup_steps=2, dtype="float32", eval_batches=4, progress=False)
    cfg.update(kw)
    return DraftTrainConfig(**cfg)


def test_loss_decreases_and_agreement_rises(setup, tmp_path):
    cfg = base_cfg(setup, tmp_path / "run")
    target = load_target(cfg.model)
    val = TokenWindows.from_folder(cfg.data, "val", cfg.seq_len)
    before = evaluate_draft(target, initial_draft(cfg, target), val, cfg)
    result = train_draft(cfg, resume=False, target=target)
    assert result.step == 30
    assert np.mean(result.losses[-3:]) < 0.5 * result.losses[0], result.losses
    assert np.mean(result.agree[-3:]) > result.agree[0] + 0.3, result.agree
    assert result.val["val_agree"] > before["val_agree"] + 0.3 and result.val["val_agree_2"] > before["val_agree_2"]
    assert result.val["val_top10"] >= result.val["val_agree"]
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, 31))
    assert all({"kl", "feature", "agree", "kl_2", "feature_2", "agree_2"} <= r.keys() for r in records)


def test_unrolled_step_sees_what_a_depth_two_tree_node_sees(setup):
    """Pair (f_{s-1}, x_{s+1}) at position s attends to the first step's pairs 0 .. s-1 and itself: the same as
    a plain causal forward over [pairs 0 .. s-1, that pair] (how inference feeds a tree node)."""
    cfg = base_cfg(setup, Path("unused"))
    target = load_target(cfg.model)
    draft = initial_draft(cfg, target)
    ids = torch.randint(3, VOCAB, (2, 12))
    batch = Batch(ids, ids.roll(-1, 1))
    with torch.no_grad():
        st = draft_steps(target, draft, batch, unroll=True)
        h = target.hidden_states(ids)
        for s in (1, 5, 10):
            tokens = torch.cat([ids[:, 1:s + 1], ids[:, s + 1:s + 2]], dim=1)  # x_1 .. x_s, then x_{s+1}
            hidden = torch.cat([h[:, :s], st.f1[:, s - 1:s]], dim=1)  # h_0 .. h_{s-1}, then f_{s-1}
            pos = torch.arange(s + 1).expand(2, s + 1)
            cos, sin = target.rotary(pos, 12)
            f = draft.layer(draft.fuse_inputs(target, tokens, hidden), cos, sin, AttentionMetadata(positions=pos),
                            DenseAttention())
            torch.testing.assert_close(st.f2[:, s - 1], f[:, -1], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(st.f1[:, s - 1], f[:, -2], atol=1e-5, rtol=1e-5)


def draft_args(setup, out: Path, *extra: str) -> list[str]:
    shards, model = setup
    return ["train", "draft", "--model", str(model), "--data", str(shards), "--out", str(out), "--batch-size", "4",
            "--seq-len", "48", "--lr", "1e-2", "--warmup", "2", "--dtype", "float32", "--save-every", "3",
            "--eval-batches", "2", "--no-progress", *extra]


def test_resume_equals_uninterrupted_run(setup, tmp_path, capsys):
    """4 steps, then --resume to 8 (new objects, state from the checkpoint) == 8 steps in one go: the same
    metrics and the same exported weights, bit for bit."""
    assert main(draft_args(setup, tmp_path / "ref", "--steps", "8")) == 0
    assert main(draft_args(setup, tmp_path / "run", "--steps", "4")) == 0
    assert main(draft_args(setup, tmp_path / "run", "--steps", "8")) == 2  # no --resume: refuses to clobber
    assert "pass --resume" in capsys.readouterr().err
    assert main(draft_args(setup, tmp_path / "run", "--steps", "8", "--resume", "--lr", "2e-2")) == 2
    assert "--lr" in capsys.readouterr().err
    assert main(draft_args(setup, tmp_path / "run", "--steps", "8", "--resume")) == 0
    strip = lambda rs: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rs if "loss" in r]  # noqa: E731
    ref, run = read_metrics(tmp_path / "ref" / "metrics.jsonl"), read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in strip(run)] == list(range(1, 9)) and strip(run) == strip(ref)
    a = load_file(tmp_path / "ref" / "final" / "model.safetensors")
    b = load_file(tmp_path / "run" / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # `train export` of a draft run's checkpoint writes a draft folder
    assert main(["train", "export", str(tmp_path / "run"), "--out", str(tmp_path / "exported")]) == 0
    c = load_file(tmp_path / "exported" / "model.safetensors")
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_save_load_round_trip_gives_identical_outputs(setup, tmp_path):
    cfg = base_cfg(setup, tmp_path / "run", steps=3)
    target = load_target(cfg.model)
    result = train_draft(cfg, resume=False, target=target)
    from minicpm4.train.draft import finish

    folder = finish(result, cfg)
    loaded = load_draft(folder, target.config)
    assert loaded.options == result.draft.options
    assert json.loads((folder / "config.json").read_text())["draft_train"]["step"] == 3
    batch = TokenWindows.from_folder(cfg.data, "val", cfg.seq_len).batch([0, 1])
    with torch.no_grad():
        a = draft_forward(target, result.draft.eval(), batch, unroll=True, topk=3)
        b = draft_forward(target, loaded.eval(), batch, unroll=True, topk=3)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def mtp_logits_pair(target, mtp, draft, ids):
    """(the MTP head's logits, the converted draft's logits) [B, T-1, V] on the same tokens."""
    B, T = ids.shape
    positions = torch.arange(T).expand(B, T)
    with torch.no_grad():
        h = target.hidden_states(ids, positions)
        ref = target.logits(mtp(target, h, ids, positions))
        cos, sin = target.rotary(positions[:, :-1], T)
        f = draft.layer(draft.fuse_inputs(target, ids[:, 1:], h[:, :-1]), cos, sin,
                        AttentionMetadata(positions=positions[:, :-1]), DenseAttention())
        return ref, target.logits(draft.head_input(f))


@pytest.mark.parametrize("scale_emb,embed_first", [(16, True), (12, False), (12, True)])
def test_mtp_conversion_is_exact(scale_emb, embed_first):
    """draft_from_mtp computes the MTP head's function: bit for bit when the head was trained embedding-first and
    scale_emb is a power of two; else to fp32 rounding (the draft normalises Embed * scale_emb where the MTP head
    normalises Embed, with the eps rescaled to match; a hidden-first head's projection columns are swapped,
    which reorders the matmul's sum)."""
    config = tiny(vocab_size=VOCAB, scale_emb=scale_emb)
    target = build_model(config, seed=1)
    mtp = MTPHead(config, embed_first)
    mup.init_weights(mtp, config, torch.Generator().manual_seed(2))
    ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(3))
    ref, out = mtp_logits_pair(target, mtp, draft_from_mtp(mtp, config), ids)
    if scale_emb == 16 and embed_first:
        assert torch.equal(ref, out)
    else:
        torch.testing.assert_close(out, ref, atol=2e-6, rtol=0)


def test_convert_mtp_only_from_a_run_and_from_its_checkpoint(setup, tmp_path, capsys):
    """--convert-mtp-only writes a draft folder whose logits are the pretraining MTP head's; the head loads from
    the run's exported mtp_head.safetensors and, identically, from its DCP checkpoint."""
    shards, model = setup
    target = load_target(model)
    assert main(["train", "draft", "--model", str(model), "--out", str(tmp_path / "conv"), "--init",
                 f"mtp:{model.parent}", "--convert-mtp-only"]) == 0, capsys.readouterr().err
    draft = load_draft(tmp_path / "conv" / "final", target.config)
    from_file = load_mtp_head(model.parent, target)
    from_ckpt = load_mtp_head(model.parent / "checkpoints" / "step_00000025", target)
    assert all(torch.equal(a, b) for a, b in zip(from_file.state_dict().values(), from_ckpt.state_dict().values()))
    ids = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    ref, out = mtp_logits_pair(target, from_file, draft, ids)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=0)
    # and it is a usable starting point: an MTP-initialised draft agrees with the target from step 0
    cfg = base_cfg(setup, tmp_path / "x", init=f"mtp:{model.parent}")
    val = TokenWindows.from_folder(shards, "val", 48)
    rand = evaluate_draft(target, initial_draft(base_cfg(setup, tmp_path / "y"), target), val, cfg)
    assert evaluate_draft(target, initial_draft(cfg, target), val, cfg)["val_agree"] > rand["val_agree"]


def test_help_and_errors_name_the_flag(setup, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["train", "draft", "--help"])
    assert e.value.code == 0 and "--convert-mtp-only" in capsys.readouterr().out
    assert main(draft_args(setup, tmp_path / "a", "--seq-len", "2048")) == 2
    assert "--seq-len must be in [3, 1024]" in capsys.readouterr().err
    assert main(draft_args(setup, tmp_path / "b", "--init", "nonsense")) == 2
    assert "--init must be" in capsys.readouterr().err
    assert main(["train", "draft", "--model", str(setup[1]), "--out", str(tmp_path / "c")]) == 2
    assert "--data" in capsys.readouterr().err
    assert main(["train", "draft", "--model", str(tmp_path), "--data", str(setup[0]), "--out", str(tmp_path / "d")]) \
        == 2
    assert "--model" in capsys.readouterr().err
