"""`minicpm4 train qat`: BitCPM4 ternary QAT as a training stage (minicpm4/train/qat.py, MINICPM4.md §5).

One float run (stage 1, the CLI's pretrain on test_train's counting corpus) and one QAT run from its final model
(stage 2) are shared by the module; each test reads what it needs from them. Single-threaded like test_train.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from minicpm4.attention.document_mask import enable_document_mask
from minicpm4.checkpoint import load_model, save_model
from minicpm4.cli import build_parser, main
from minicpm4.config import tiny
from minicpm4.generate import generate
from minicpm4.model import build_model
from minicpm4.quant import FakeTernaryLinear, TernaryLinear, TernaryQATConfig, dense_weight, quantize_, target_linears
from minicpm4.quant import linear
from minicpm4.sampling import SamplingParams
from minicpm4.train import mup, qat, stages
from minicpm4.train.data import TokenWindows
from minicpm4.train.default_model import validation_loss
from minicpm4.train.distributed import DistInfo
from minicpm4.train.metrics import read_metrics
from minicpm4.train.trainer import TrainConfig, TrainModule, build_train_module, evaluate
from test_train import write_shards  # tests/ is on sys.path (conftest.py's folder); the same toy corpus

pytestmark = pytest.mark.usefixtures("one_thread")
DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "minicpm4" / "assets" / "default-model"
GROUP = 32  # divides tiny()'s hidden 64 and intermediate 160
SEQ = 64
# stage 1: 120 steps of 8 x 64 tokens, the last 20 decaying -> the QAT default budget is 2 x 20 x 512 = 40 steps
FLOAT_STEPS, FLOAT_DECAY, BATCH = 120, 20, 8
QAT_STEPS = 2 * FLOAT_DECAY  # same batch: 2x the decay tokens is 2x the decay steps


def qat_args(init: Path, shards: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "qat", "--init", str(init), "--data", str(shards), "--out", str(out), "--group-size", str(GROUP),
            "--batch-size", str(BATCH), "--seq-len", str(SEQ), "--dtype", "float32", "--save-every", "5",
            "--eval-batches", "4", "--peak-tflops", "0.1", "--no-progress", *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_thread) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("qat")
    shards = write_shards(root / "shards")
    assert main(["train", "pretrain", "--data", str(shards), "--out", str(root / "float"), "--model-config", "tiny",
                 "--steps", str(FLOAT_STEPS), "--batch-size", str(BATCH), "--seq-len", str(SEQ), "--dtype", "float32",
                 "--lr", "1e-2", "--warmup", "2", "--decay", str(FLOAT_DECAY), "--mtp-weight", "0",
                 "--eval-batches", "4", "--peak-tflops", "0.1", "--no-progress"]) == 0
    assert main(qat_args(root / "float" / "final", shards, root / "qat")) == 0
    return {"shards": shards, "float": root / "float", "qat": root / "qat"}


def val_tokens(shards: Path) -> np.ndarray:
    return np.fromfile(shards / "val.bin", dtype=np.uint16)


# ---- the quantizer inside the training module ----------------------------------------------------------------

def test_prepared_linears_are_ternary_per_group_with_straight_through_gradients():
    """Every decoder linear of a QAT training module computes with {-1, 0, +1} x its group's absmean (checked per
    group, the scale recomputed here), and each float weight's gradient is the gradient of the plain model at the
    ternarised weights (STE)."""
    torch.manual_seed(0)
    config = tiny(vocab_size=128)
    module = build_train_module(config, TrainConfig(qat_group_size=GROUP, dtype="float32"))
    linears = target_linears(module.model)
    assert len(linears) == 7 * config.num_hidden_layers and all(isinstance(m, FakeTernaryLinear) for _, m in linears)
    for name, lin in linears:
        w = lin.weight.detach()
        wq = dense_weight(lin).view(w.shape[0], -1, GROUP)
        s = w.view(w.shape[0], -1, GROUP).abs().mean(-1, keepdim=True).clamp(min=1e-5)
        codes = wq / s
        assert torch.allclose(codes, codes.round(), atol=1e-5), name
        assert set(codes.round().unique().tolist()) <= {-1.0, 0.0, 1.0}, name
        assert torch.equal(codes.round(), torch.clamp(torch.round(w.view_as(wq) / s), -1, 1)), name

    ids = torch.randint(3, 128, (2, 16))
    labels = ids.roll(-1, 1)
    module(ids, labels)[0].backward()
    plain = build_train_module(config, TrainConfig(dtype="float32"))  # float linears, holding the ternary values
    with torch.no_grad():
        for (name, lin), (_, ref) in zip(linears, target_linears(plain.model)):
            ref.weight.copy_(dense_weight(lin))
        for (n, p), (_, ref) in zip(module.named_parameters(), plain.named_parameters()):
            if "_proj" not in n:
                ref.copy_(p)
    plain(ids, labels)[0].backward()
    for (name, lin), (_, ref) in zip(linears, target_linears(plain.model)):
        assert lin.weight.grad is not None and torch.allclose(lin.weight.grad, ref.weight.grad, atol=1e-6), name


def test_qat_keeps_parameter_names_and_mup_groups():
    """prepare swaps modules but not parameters: the names checkpoints and muP groups use are unchanged."""
    config = tiny(vocab_size=128)
    float_module = build_train_module(config, TrainConfig(seed=3))
    qat_module = build_train_module(config, TrainConfig(seed=3, qat_group_size=16))
    assert [n for n, _ in qat_module.named_parameters()] == [n for n, _ in float_module.named_parameters()]
    assert "model.model.layers.0.self_attn.q_proj.weight" in dict(qat_module.named_parameters())
    groups = [(g["name"], len(g["params"]), g["lr"]) for g in mup.param_groups(qat_module, config, 5e-3, 0.1)]
    assert groups == [(g["name"], len(g["params"]), g["lr"]) for g in mup.param_groups(float_module, config, 5e-3, 0.1)]
    assert qat.group_size_of(qat_module.model) == 16 and qat.group_size_of(float_module.model) is None


# ---- the stage: budget, schedule, quality, export, resume ----------------------------------------------------

def test_qat_run_rewarms_the_lr_for_twice_the_source_decay_tokens(runs):
    records = [r for r in read_metrics(runs["qat"] / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, QAT_STEPS + 1))  # 2 x the float run's decay steps
    lr = [r["lr"] for r in records]
    float_last_lr = [r["lr"] for r in read_metrics(runs["float"] / "metrics.jsonl") if "lr" in r][-1]
    warmup = round(stages.QAT_WARMUP_FRACTION * QAT_STEPS)
    assert warmup >= 2 and float_last_lr == pytest.approx(1e-3)  # stage 1 ended decayed to 10% of its 1e-2
    assert lr[:warmup] == pytest.approx([5e-3 * (s + 1) / warmup for s in range(warmup)])  # re-warmup to 1e-2 / 2
    assert lr[-1] == pytest.approx(5e-4)  # its own decay to 10%


def test_qat_beats_post_training_ternarisation(runs):
    """Same float checkpoint, same group size: QAT's packed model has a clearly lower validation loss than packing
    the float weights directly, and stays above the float model (fixed seeds; measured 0.283 float, 0.343 QAT,
    1.675 post-training ternary: the asserted margin is under half the measured one)."""
    tokens = val_tokens(runs["shards"])
    float_model = load_model(runs["float"] / "final")
    float_loss = validation_loss(float_model, tokens, SEQ)
    quantize_(float_model, TernaryQATConfig(step="convert", group_size=GROUP))
    ptq_loss = validation_loss(float_model, tokens, SEQ)
    qat_loss = validation_loss(load_model(runs["qat"] / "final"), tokens, SEQ)
    assert float_loss < qat_loss < ptq_loss - 0.5, (float_loss, qat_loss, ptq_loss)


def test_exported_qat_run_is_the_packed_ternary_model(runs, tmp_path, monkeypatch):
    final = runs["qat"] / "final"
    q = json.loads((final / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == "minicpm4_ternary" and q["group_size"] == GROUP
    model = load_model(final)
    assert all(isinstance(m, TernaryLinear) for _, m in target_linears(model))
    # the packed model computes what the fake-quantized training forward computed: the run's last val_loss (on the
    # PyTorch path; the C++ kernel also rounds activations to int8, test_kernels.py bounds that)
    monkeypatch.setattr(linear, "_kernels", lambda: None)
    cfg = TrainConfig(micro_batch_size=BATCH, seq_len=SEQ, eval_batches=4, dtype="float32")
    val = TokenWindows.from_folder(runs["shards"], "val", SEQ)
    logged = [r["val_loss"] for r in read_metrics(runs["qat"] / "metrics.jsonl") if "val_loss" in r][-1]
    enable_document_mask(model)  # as train() evaluated it
    assert evaluate(TrainModule(model), val, cfg, DistInfo())["val_loss"] == pytest.approx(logged, rel=1e-5)
    # it generates; the counting corpus makes the continuation predictable
    out = generate(model, [[1, 40, 41, 42, 43]], SamplingParams(max_new_tokens=4, temperature=0.0))[0]
    assert len(out.token_ids) == 4 and out.token_ids[:2] == [44, 45], out.token_ids
    # `train export` of the qat run writes the same packed model
    assert main(["train", "export", str(runs["qat"]), "--out", str(tmp_path / "exported")]) == 0
    from safetensors.torch import load_file
    a, b = load_file(final / "model.safetensors"), load_file(tmp_path / "exported" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.endswith("q_proj.qweight") for k in a) and not any(k.endswith("q_proj.weight") for k in a)


def test_qat_kill_and_resume_matches_the_uninterrupted_run(runs, tmp_path):
    args = qat_args(runs["float"] / "final", runs["shards"], tmp_path / "run")
    env = {**os.environ, "MINICPM4_TRAIN_KILL_AT_STEP": "7", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "minicpm4", *args], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]  # SIGKILLed after step 7; last checkpoint step 5
    assert main([*args, "--resume"]) == 0
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("tokens_per_s", "mfu")} for r in rs]  # noqa: E731
    assert strip(read_metrics(tmp_path / "run" / "metrics.jsonl")) == strip(read_metrics(runs["qat"] / "metrics.jsonl"))


def test_qat_budget_and_init_errors(runs, tmp_path, capsys):
    loose = tmp_path / "loose"  # an HF folder outside any run: its decay tokens are unknown
    save_model(load_model(runs["float"] / "final"), loose)
    assert main(qat_args(loose, runs["shards"], tmp_path / "a")) == 2
    assert "--tokens" in capsys.readouterr().err
    assert main(qat_args(runs["qat"] / "final", runs["shards"], tmp_path / "b", "--steps", "1")) == 2
    assert "already quantized" in capsys.readouterr().err


def test_qat_on_the_default_model_then_generate(tmp_path, capsys):
    """The bundled bf16 model (hidden 192: group 64), a couple of steps on its own validation tokens, then
    `minicpm4 generate --model RUN/final` runs the packed result with the tokenizer copied from --init."""
    shards = tmp_path / "shards"
    shards.mkdir()
    np.load(DEFAULT_MODEL / "val_tokens.npy").astype(np.uint16).tofile(shards / "train.bin")
    (shards / "meta.json").write_text(json.dumps({"dtype": "uint16", "vocab_size": 8192, "bos_token_id": 1,
                                                  "eos_token_id": 2}))
    assert main(["train", "qat", "--init", str(DEFAULT_MODEL), "--data", str(shards), "--out", str(tmp_path / "run"),
                 "--steps", "2", "--batch-size", "2", "--seq-len", "64", "--dtype", "float32", "--peak-tflops", "0.1",
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["generate", "--model", str(tmp_path / "run" / "final"), "-n", "6", "--temperature", "0",
                 "The word"]) == 0
    assert capsys.readouterr().out.strip()


def test_qat_help(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["train", "qat", "--help"])
    assert e.value.code == 0 and "--group-size" in capsys.readouterr().out
