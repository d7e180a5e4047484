"""Training core: WSD, muP, MTP, loss normalisation, packing/SFT masks, kill-and-resume, torchrun DDP/FSDP2.

Everything runs single-threaded (the CI box has 2 shared cores; oversubscribed OpenMP threads are 10-30x
slower) and bit-identity claims are made at that thread count on CPU fp32.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from minicpm4.api import BUNDLED_TOKENIZER_DIR
from minicpm4.cli import build_parser, main
from minicpm4.config import SparseConfig, tiny
from minicpm4.tokenizer import Tokenizer
from minicpm4.train import mup
from minicpm4.train.data import Batch, EpochSampler, SyntheticTokens, TokenWindows, micro_batch_indices
from minicpm4.train.distributed import DistInfo
from minicpm4.attention.document_mask import enable_document_mask
from minicpm4.train.losses import IGNORE_INDEX, LossNormalizer
from minicpm4.train.metrics import read_metrics
from minicpm4.train.schedule import WSD, wsd
from minicpm4.train.sft_data import PackedConversations, encode_conversation
from minicpm4.train.stages import extend_rope, long_context, longrope_ramp, model_10m, sparse_backend_available
from minicpm4.train.trainer import TrainConfig, build_train_module, forward_backward, train

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def write_shards(folder: Path, num_docs: int = 600, seed: int = 0, vocab: int = 256, modulus: int = 250,
                 max_start: int = 200, max_len: int = 100) -> Path:
    """Learnable toy corpus in the shard format: each document counts upwards from a random start (ids wrap at
    modulus + 3; 0-2 are pad/BOS/EOS)."""
    rng = np.random.default_rng(seed)
    docs = [np.concatenate([[1], (rng.integers(3, max_start) + np.arange(rng.integers(20, max_len))) % modulus + 3, [2]])
            for _ in range(num_docs)]
    tokens = np.concatenate(docs).astype(np.uint16)
    split = int(len(tokens) * 0.9)
    folder.mkdir(parents=True, exist_ok=True)
    tokens[:split].tofile(folder / "train.bin")
    tokens[split:].tofile(folder / "val.bin")
    meta = {"dtype": "uint16", "vocab_size": vocab, "bos_token_id": 1, "eos_token_id": 2, "num_tokens": int(len(tokens))}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("shards"))


def small_cfg(out: Path, **kw) -> TrainConfig:
    base = dict(out_dir=str(out), steps=6, micro_batch_size=4, grad_accum=1, seq_len=64, lr=1e-2, warmup_steps=1,
                decay_steps=2, dtype="float32", mtp_weight=0.3, peak_flops=1e11, progress=False, parallel="none")
    base.update(kw)
    return TrainConfig(**base)


# ---- WSD ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", ["linear", "cosine", "exp", "1-sqrt"])
def test_wsd_phase_boundaries(shape):
    s = WSD(total_steps=100, warmup_steps=10, decay_steps=20, decay_shape=shape, min_ratio=0.1)
    assert s.stable_steps == 70
    assert s(0) == pytest.approx(0.1)  # (0 + 1) / 10: the first step already moves
    assert s(9) == 1.0  # warmup ends exactly at the peak
    assert s(10) == 1.0 and s(79) == 1.0  # first and last stable steps
    assert s(80) < 1.0  # first decay step
    assert s(99) == pytest.approx(0.1)  # last step: exactly the minimum
    assert s(500) == pytest.approx(0.1)  # past the end: stays there
    values = [s(i) for i in range(10, 100)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    middle = {"linear": 0.55, "cosine": 0.55, "exp": math.sqrt(0.1), "1-sqrt": 1 - 0.9 * math.sqrt(0.5)}[shape]
    assert s(89) == pytest.approx(middle)  # p = (89 - 80 + 1) / 20 = 0.5
    assert wsd(89, 10, 70, 20, shape, 0.1) == s(89)  # the dataclass is the pure function


def test_wsd_validation():
    with pytest.raises(ValueError, match="decay_shape"):
        WSD(10, decay_shape="step")
    with pytest.raises(ValueError, match="exceed"):
        WSD(10, warmup_steps=6, decay_steps=6)
    assert WSD.from_fractions(1000).warmup_steps == 10 and WSD.from_fractions(1000).decay_steps == 100


# ---- muP ---------------------------------------------------------------------------------------------

def wide(hidden: int):
    return tiny(vocab_size=512, hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=hidden // 16,
                dim_model_base=32, tie_word_embeddings=False)


@pytest.mark.parametrize("hidden", [128, 256])
def test_mup_groups_and_init_scale_with_width(hidden):
    config = wide(hidden)
    wm = hidden / 32
    module = build_train_module(config, TrainConfig(mtp_weight=0.3, seed=1))
    sd = dict(module.named_parameters())
    assert sd["model.model.layers.0.self_attn.q_proj.weight"].std().item() == pytest.approx(0.1 / math.sqrt(wm), rel=0.05)
    assert sd["model.model.layers.1.mlp.down_proj.weight"].std().item() == pytest.approx(0.1 / math.sqrt(wm), rel=0.05)
    assert sd["mtp.proj.weight"].std().item() == pytest.approx(0.1 / math.sqrt(wm), rel=0.05)
    assert sd["model.model.embed_tokens.weight"].std().item() == pytest.approx(0.1, rel=0.05)
    assert sd["model.lm_head.weight"].std().item() == pytest.approx(0.1, rel=0.05)
    assert torch.all(sd["model.model.norm.weight"] == 1)

    groups = {g["name"]: g for g in mup.param_groups(module, config, lr=1e-2, weight_decay=0.1)}
    assert groups["hidden"]["lr"] == pytest.approx(1e-2 / wm)
    assert groups["embedding"]["lr"] == 1e-2 and groups["vector"]["lr"] == 1e-2
    assert groups["vector"]["weight_decay"] == 0.0 and groups["hidden"]["weight_decay"] == 0.1
    ids = [id(p) for g in groups.values() for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(module.parameters()))  # each parameter in exactly one group
    assert {id(sd["model.lm_head.weight"]), id(sd["model.model.embed_tokens.weight"])} <= {id(p) for p in groups["embedding"]["params"]}
    assert all(p.ndim == 1 for p in groups["vector"]["params"])


@pytest.mark.parametrize("hidden", [128, 256])
def test_standard_parametrization(hidden):
    sp = mup.apply_parametrization(wide(hidden), "standard")
    assert sp.scale_emb == 1 and sp.residual_scale == pytest.approx(1.0) and sp.logit_divisor == 1.0
    module = build_train_module(wide(hidden), TrainConfig(parametrization="standard", seed=1))
    assert module.model.config.logit_divisor == 1.0
    q = module.model.model.layers[0].self_attn.q_proj.weight
    assert q.std().item() == pytest.approx(0.1, rel=0.05)  # constant init, whatever the width
    lrs = {g["lr"] for g in mup.param_groups(module, module.model.config, 1e-3, 0.1)}
    assert lrs == {1e-3}


# ---- MTP ---------------------------------------------------------------------------------------------

def test_mtp_head_shape_causality_and_gradient():
    torch.manual_seed(0)
    config = tiny(vocab_size=128)
    module = build_train_module(config, TrainConfig(mtp_weight=0.5))
    model, head = module.model, module.mtp
    ids = torch.randint(3, 128, (2, 12))
    positions = torch.arange(12).expand(2, 12)
    hidden = model.hidden_states(ids, positions)
    h_mtp = head(model, hidden, ids, positions)
    assert h_mtp.shape == (2, 11, config.hidden_size)
    # row i sees x_0 .. x_{i+1} only: changing x_6 leaves rows 0..4 alone and changes row 5
    ids2 = ids.clone()
    ids2[:, 6] = (ids2[:, 6] + 1) % 128
    h2 = head(model, model.hidden_states(ids2, positions), ids2, positions)
    assert torch.allclose(h_mtp[:, :5], h2[:, :5], atol=1e-6) and not torch.allclose(h_mtp[:, 5], h2[:, 5])
    # the loss: CE of the shared head's logits against x_{i+2}; gradients reach the head and the main model
    labels = torch.cat([ids[:, 1:], torch.full((2, 1), IGNORE_INDEX)], dim=1)
    sums = module(ids, labels)
    expected = torch.nn.functional.cross_entropy(model.logits(h_mtp[:, :-1]).reshape(-1, 128), ids[:, 2:].reshape(-1),
                                                 reduction="sum")  # the last row's target is beyond the sequence
    assert sums.shape == (2,) and torch.allclose(sums[1], expected, rtol=1e-5)
    sums[1].backward()
    assert head.proj.weight.grad.abs().sum() > 0 and head.layer.mlp.up_proj.weight.grad.abs().sum() > 0
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0  # through h_i
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0  # shared embedding and output head


# ---- losses, data, document mask --------------------------------------------------------------------

def test_loss_normalisation_is_per_token_across_micro_batches():
    """Two micro-batches with 30 and 3 targets give the gradient of the full batch (not a mean of means)."""
    torch.manual_seed(0)
    config = tiny(vocab_size=64)
    cfg = TrainConfig(dtype="float32", mtp_weight=0.0)
    ids = torch.randint(3, 64, (2, 16))
    labels = ids.roll(-1, 1)
    labels[1, 3:] = IGNORE_INDEX  # the second row has only 3 targets
    full = Batch(ids, labels.clone())
    parts = [Batch(ids[:1], labels[:1]), Batch(ids[1:], labels[1:])]
    grads = []
    for batches in ([full], parts):
        module = build_train_module(config, cfg)
        forward_backward(module, batches, cfg, DistInfo(), "none")
        grads.append(torch.cat([p.grad.flatten() for p in module.parameters()]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-7)
    assert LossNormalizer(33, world_size=2)(torch.tensor(66.0)).item() == pytest.approx(4.0)


def test_packed_windows_sampling_and_document_mask():
    data = SyntheticTokens(vocab_size=100, seq_len=32, num_tokens=2000, doc_len=20)
    b = data.batch([0, 1])
    assert torch.equal(b.input_ids[:, 1:], b.labels[:, :-1])
    assert b.segment_ids[0, 0] == 1 and b.segment_ids[0, 20] == 2  # a new segment at each BOS
    # sampling: deterministic, a permutation per epoch, ranks disjoint, split-independent
    s = EpochSampler(len(data), seed=3)
    epoch = [s(g) for g in range(len(data))]
    assert sorted(epoch) == list(range(len(data))) and epoch != sorted(epoch)
    two_ranks = [i for r in range(2) for m in range(2) for i in micro_batch_indices(8, m, r, 2, 3)]
    one_rank = [i for m in range(4) for i in micro_batch_indices(8, m, 0, 1, 3)]
    assert sorted(two_ranks) == one_rank == list(range(8, 20))
    # document mask: a packed document's outputs equal the document run alone
    torch.manual_seed(0)
    module = build_train_module(tiny(vocab_size=100), TrainConfig())
    enable_document_mask(module.model)
    ids = b.input_ids[:1]
    from minicpm4.attention.document_mask import document_metadata
    pos = torch.arange(32)[None]
    packed = module.model.hidden_states(ids, pos, meta=document_metadata(pos, b.segment_ids[:1]))
    alone = module.model.hidden_states(ids[:, 20:], pos[:, :12])
    assert torch.allclose(packed[:, 20:], alone, atol=1e-5)


# ---- SFT ---------------------------------------------------------------------------------------------

def test_sft_mask_covers_exactly_the_assistant_tokens():
    tok = Tokenizer.from_pretrained(BUNDLED_TOKENIZER_DIR)
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}]
    ids, trained = encode_conversation(tok, conv)
    assert ids == tok.encode_chat(conv, add_generation_prompt=False)
    runs, cur = [], []
    for i, t in zip(ids, trained):
        if t:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    assert [tok.decode(r) for r in runs] == ["Hello! How can I help?<|im_end|>", "4<|im_end|>"]
    im_end, im_start = tok.token_to_id("<|im_end|>"), tok.token_to_id("<|im_start|>")
    assert sum(trained) == sum(len(r) for r in runs) and all(r[-1] == im_end for r in runs)
    assert not any(t for i, t in zip(ids, trained) if i in (im_start, tok.bos_token_id))

    # packing: two conversations in one row; labels are exactly the trained tokens, shifted; no leaks
    other = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]
    ids2, trained2 = encode_conversation(tok, other)
    packed = PackedConversations.build([(ids, trained), (ids2, trained2)], seq_len=len(ids) + len(ids2) + 5, pad_id=im_end)
    assert len(packed) == 1
    batch = packed.batch([0])
    flat_ids, flat_trained = ids + ids2, trained + trained2
    expected = [flat_ids[t + 1] if flat_trained[t + 1] else IGNORE_INDEX for t in range(len(flat_ids) - 1)]
    assert batch.labels[0, :len(expected)].tolist() == expected
    assert (batch.labels[0, len(expected):] == IGNORE_INDEX).all()  # padding and the boundary
    seg = batch.segment_ids[0].tolist()
    assert seg[:len(ids)] == [0] * len(ids) and seg[len(ids):len(flat_ids)] == [1] * len(ids2) and seg[-1] == 2
    assert packed.stats.trained_tokens == sum(trained) + sum(trained2)


# ---- training runs -----------------------------------------------------------------------------------

def test_loss_decreases_on_a_tiny_model(shards, tmp_path):
    config = tiny(vocab_size=256, eos_token_id=2)
    data = TokenWindows.from_folder(shards, "train", 64)
    val = TokenWindows.from_folder(shards, "val", 64)
    result = train(config, small_cfg(tmp_path / "run", steps=12, decay_steps=3, eval_batches=2), data, val)
    assert result.step == 12 and len(result.losses) == 12
    assert np.mean(result.losses[-3:]) < result.losses[0] - 1.0, result.losses
    assert result.val["val_loss"] < result.losses[0] - 1.0
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 13))
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] for r in records if "loss" in r)
    pytest.importorskip("matplotlib")
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000


def cli_args(shards: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "pretrain", "--data", str(shards), "--out", str(out), "--model-config", "tiny", "--steps", "8",
            "--batch-size", "4", "--seq-len", "64", "--dtype", "float32", "--lr", "1e-2", "--warmup", "2",
            "--decay", "3", "--mtp-weight", "0.3", "--save-every", "3", "--keep", "2", "--peak-tflops", "0.1",
            "--eval-batches", "2", "--no-progress", *extra]


def test_kill_and_resume_is_bit_identical(shards, tmp_path, capsys):
    """A run SIGKILLed after step 5 (last checkpoint: step 3), resumed by a new process/objects, logs exactly
    the losses of an uninterrupted run, and ends with identical weights."""
    assert main(cli_args(shards, tmp_path / "ref")) == 0
    env = {**os.environ, "MINICPM4_TRAIN_KILL_AT_STEP": "5", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "minicpm4", *cli_args(shards, tmp_path / "run")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr  # died by SIGKILL, no clean-up ran
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["latest", "step_00000003"]
    assert len(read_metrics(tmp_path / "run" / "metrics.jsonl")) > 3  # steps 4-5 logged by the killed run
    assert main(cli_args(shards, tmp_path / "run")) == 2  # no --resume: refuses to clobber the run
    assert "pass --resume" in capsys.readouterr().err
    assert main(cli_args(shards, tmp_path / "run", "--resume")) == 0

    ref, run = read_metrics(tmp_path / "ref" / "metrics.jsonl"), read_metrics(tmp_path / "run" / "metrics.jsonl")
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("tokens_per_s", "mfu")} for r in rs]  # noqa: E731
    assert [r["step"] for r in run if "loss" in r] == list(range(1, 9))
    assert strip(run) == strip(ref)  # loss, mtp_loss, lr, grad_norm, val_loss: bit-identical
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["latest", "step_00000006", "step_00000008"]  # keep 2
    from safetensors.torch import load_file
    a, b = load_file(tmp_path / "ref" / "final" / "model.safetensors"), load_file(tmp_path / "run" / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_stable_phase_checkpoint_extends_into_a_longer_run(shards, tmp_path, capsys):
    """WSD: resumed from a checkpoint taken before its decay began, with more --steps and a new --decay, the run
    keeps the saved LR up to the new decay and then decays to the end; other settings stay locked."""
    run = tmp_path / "run"
    kill = {**os.environ, "MINICPM4_TRAIN_KILL_AT_STEP": "4", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "minicpm4", *cli_args(shards, run)], env=kill, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr  # stopped after its step-3 checkpoint, in the stable phase (decay 6-8)
    assert main(cli_args(shards, run, "--resume", "--lr", "2e-2")) == 2
    assert "--lr" in capsys.readouterr().err
    extended = [a if a not in ("8", "3") else {"8": "12", "3": "4"}[a] for a in cli_args(shards, run)]
    assert main([*extended, "--resume"]) == 0
    lrs = {r["step"]: r["lr"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r}
    assert sorted(lrs) == list(range(1, 13))
    assert all(lrs[s] == pytest.approx(1e-2) for s in range(3, 9))  # stable through the old decay's steps
    assert all(lrs[s] < lrs[s - 1] for s in range(9, 13))  # the new 4-step decay
    from minicpm4.train.checkpointing import latest_checkpoint, read_train_state
    saved = read_train_state(latest_checkpoint(run)).train_config
    assert saved["steps"] == 12 and saved["decay_steps"] == 4


WORKER = textwrap.dedent('''
    import sys, torch
    from pathlib import Path
    from minicpm4.config import SparseConfig, tiny
    from minicpm4.train.data import SyntheticTokens, micro_batch_indices
    from minicpm4.train.distributed import init_distributed, wrap
    from minicpm4.train.trainer import TrainConfig, build_train_module, forward_backward, train

    out = Path(sys.argv[1])
    info = init_distributed("cpu")
    config = tiny(vocab_size=128)
    data = SyntheticTokens(128, 32, num_tokens=20000, doc_len=24)
    for mode in ("ddp", "fsdp"):
        cfg = TrainConfig(dtype="float32", mtp_weight=0.3, seed=0)
        module = build_train_module(config, cfg)
        units = list(module.model.model.layers) + [module.mtp.layer]
        wrapped = wrap(module, mode, info, shard_units=units)
        micro = [data.batch(micro_batch_indices(0, m, info.rank, 2, 2)) for m in range(2)]
        forward_backward(wrapped, micro, cfg, info, mode)
        grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
                 for n, p in wrapped.named_parameters()}
        if info.is_main:
            torch.save({n.removeprefix("module."): g for n, g in grads.items()}, out / f"grads_{mode}.pt")
    cfg = TrainConfig(out_dir=str(out / "fsdp_run"), steps=3, micro_batch_size=2, grad_accum=2, seq_len=32,
                      dtype="float32", mtp_weight=0.3, warmup_steps=1, save_every=2, keep_last=5, parallel="fsdp",
                      peak_flops=1e11, progress=False)
    train(config, cfg, data)
''')


def test_torchrun_ddp_and_fsdp_match_single_process(tmp_path):
    """2 gloo processes (DDP, then FSDP2) give the single-process gradients of the same global batch; an
    FSDP-sharded checkpoint resumes in one process and continues with the same loss."""
    (tmp_path / "worker.py").write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(tmp_path / "worker.py"), str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]

    config = tiny(vocab_size=128)
    data = SyntheticTokens(128, 32, num_tokens=20000, doc_len=24)
    cfg = TrainConfig(dtype="float32", mtp_weight=0.3, seed=0)
    module = build_train_module(config, cfg)
    micro = [data.batch(micro_batch_indices(0, m, 0, 1, 2)) for m in range(4)]  # same 8 samples, one rank
    forward_backward(module, micro, cfg, DistInfo(), "none")
    ref = {n: p.grad for n, p in module.named_parameters()}
    for mode in ("ddp", "fsdp"):
        grads = torch.load(tmp_path / f"grads_{mode}.pt")
        assert grads.keys() == ref.keys()
        for n, g in grads.items():
            assert torch.allclose(g, ref[n], rtol=1e-4, atol=1e-6), (mode, n, (g - ref[n]).abs().max())

    # the FSDP run's step-2 checkpoint (2 shards) resumes here on 1 process, global batch kept (accum 2 -> 4)
    run = tmp_path / "fsdp_run"
    fsdp_losses = [r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    import shutil
    shutil.rmtree(run / "checkpoints" / "step_00000003")
    (run / "checkpoints" / "latest").write_text("step_00000002\n")
    single = TrainConfig(out_dir=str(run), steps=3, micro_batch_size=2, grad_accum=4, seq_len=32, dtype="float32",
                         mtp_weight=0.3, warmup_steps=1, save_every=2, parallel="none", peak_flops=1e11, progress=False)
    resumed = train(config, single, data, resume=True)
    assert resumed.losses == pytest.approx(fsdp_losses[2:], rel=1e-4)
    uninterrupted = train(config, TrainConfig(**{**single.__dict__, "out_dir": str(tmp_path / "single")}), data, resume=False)
    assert uninterrupted.losses == pytest.approx(fsdp_losses, rel=1e-4)


# ---- stages and CLI ----------------------------------------------------------------------------------

def test_long_context_stage_config():
    base = model_10m()
    cfg_model, cfg = long_context(base, seq_len=8192, steps=10)
    assert cfg_model.rope_scaling == base.rope_scaling  # MiniCPM4 factors already cover 32K
    assert cfg.seq_len == 8192 and cfg.schedule()(9) == pytest.approx(2.75e-4 / 3e-4)
    plain = tiny(rope_scaling=None, max_position_embeddings=512)
    longer = extend_rope(plain, 2048)
    rs = longer.rope_scaling
    assert longer.max_position_embeddings == rs.original_max_position_embeddings == 2048
    f = rs.long_factor
    assert f == rs.short_factor and f == sorted(f) and 1.0 <= f[0] and f[-1] == pytest.approx(4.0)
    # 32K -> 128K on a 128-dim head reproduces the ramp of the README's published 128K list
    rope_factors = pytest.importorskip("minicpm4.rope_factors")
    assert longrope_ramp(128, 4.0, 32768) == pytest.approx(rope_factors.yarn_ramp(64), abs=1e-12)


def test_long_context_sparse_stage(tmp_path):
    """--sparse sets sparse_config (README defaults unless given) and trains through InfLLM v2 once it exists."""
    base = tiny(vocab_size=128)
    if not sparse_backend_available():
        with pytest.raises(ValueError, match="InfLLM v2"):
            long_context(base, seq_len=256, sparse=True)
        pytest.skip("the InfLLM v2 backend is not available yet")
    assert long_context(base, seq_len=8192, sparse=True)[0].sparse_config == SparseConfig()
    sparse = SparseConfig(kernel_size=32, kernel_stride=16, block_size=64, window_size=64, topk=2, dense_len=-1)
    config, cfg = long_context(base, seq_len=256, sparse=True, sparse_config=sparse, steps=2, micro_batch_size=1,
                               out_dir=str(tmp_path), dtype="float32", peak_flops=1e11, progress=False)
    result = train(config, cfg, SyntheticTokens(128, 256, num_tokens=4000, doc_len=300), resume=False)
    assert "InfLLM" in type(result.module.model.attention_backend).__name__
    assert len(result.losses) == 2 and all(math.isfinite(x) for x in result.losses)


@pytest.mark.parametrize("stage", [[], ["pretrain"], ["long"], ["sft"]])
def test_train_help(stage, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["train", *stage, "--help"])
    assert e.value.code == 0 and "usage" in capsys.readouterr().out


def test_sft_cli_end_to_end(tmp_path, capsys):
    """pretrain-sized model folder -> `train sft` on JSONL -> an HF folder with the tokenizer that loads."""
    import minicpm4
    from minicpm4.model import build_model

    init = tmp_path / "init"
    minicpm4.save_model(build_model(tiny(vocab_size=73448, eos_token_id=[2, 73440]), seed=0), init)
    convs = [{"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": w}]}
             for w in ["red", "green", "blue", "cyan"] * 4]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in convs))
    code = main(["train", "sft", "--init", str(init), "--data", str(tmp_path / "chat.jsonl"), "--tokenizer",
                 str(BUNDLED_TOKENIZER_DIR), "--out", str(tmp_path / "sft"), "--steps", "2", "--batch-size", "2",
                 "--seq-len", "64", "--dtype", "float32", "--peak-tflops", "0.1", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    pipe = minicpm4.from_pretrained(tmp_path / "sft" / "final", dtype="float32")
    assert pipe.model.config.vocab_size == 73448 and (tmp_path / "sft" / "final" / "tokenizer.model").is_file()
