"""`minicpm4 train pretrain | long | sft | qat | draft`: thin wrappers over stages.* and trainer.train (draft:
train/draft.py, the EAGLE draft head of a frozen target).

The same command runs under `torchrun --nproc_per_node N minicpm4 train ...` (DDP by default, --parallel
fsdp for FSDP2). Each run folder holds metrics.jsonl, loss.png, checkpoints/ and, at the end, final/ (a
Hugging Face model folder with the tokenizer). Re-running with --resume continues from the latest
checkpoint with the settings stored in it; an explicit flag that contradicts them is an error.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from minicpm4.errors import UserError

# flag -> TrainConfig field, for flags whose argparse default is None ("take the preset's value")
TRAIN_FLAGS = {
    "batch_size": "micro_batch_size", "grad_accum": "grad_accum", "seq_len": "seq_len", "lr": "lr",
    "warmup": "warmup_steps", "decay": "decay_steps", "decay_shape": "decay_shape", "min_lr_ratio": "min_lr_ratio",
    "weight_decay": "weight_decay", "grad_clip": "grad_clip", "mtp_weight": "mtp_weight", "dtype": "dtype",
    "parametrization": "parametrization", "seed": "seed", "eval_batches": "eval_batches",
    "group_size": "qat_group_size",  # qat only (flags a stage lacks are skipped)
}
# fields a resumed run may change freely. steps and decay_steps too: WSD's point is that a checkpoint from the
# stable phase can be continued into a longer run with its own decay (the LR is the same until the decay begins).
RESUME_FREE = ("out_dir", "steps", "decay_steps", "parallel", "device", "eval_every", "save_every", "keep_last",
               "log_every", "progress", "peak_flops", "compile", "eval_batches")
# flag -> DraftTrainConfig field, for the draft stage's flags whose argparse default is None
DRAFT_FLAGS = {
    "model": "model", "data": "data", "chat_data": "chat_data", "val_chat_data": "val_chat_data", "init": "init",
    "residual_scale": "residual_scale", "batch_size": "micro_batch_size", "grad_accum": "grad_accum",
    "seq_len": "seq_len", "lr": "lr", "warmup": "warmup_steps", "decay": "decay_steps", "decay_shape": "decay_shape",
    "min_lr_ratio": "min_lr_ratio", "weight_decay": "weight_decay", "grad_clip": "grad_clip", "seed": "seed",
    "kl_weight": "kl_weight", "feature_weight": "feature_weight", "unroll_weight": "unroll_weight", "dtype": "dtype",
    "eval_batches": "eval_batches",
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="pretrain, long-context, SFT, ternary QAT, draft training (also under torchrun) and RL")
    stages = p.add_subparsers(dest="stage", metavar="STAGE")
    stages.required = True

    from minicpm4.train.rl.cli import register_stage as register_rl

    register_rl(stages)  # train rl: chunk-wise rollout RL (minicpm4/train/rl/)

    s = stages.add_parser("export", help="write a checkpoint of a run (default: its latest) as a Hugging Face folder")
    s.add_argument("run", metavar="RUN_DIR", help="training run folder (holds checkpoints/)")
    s.add_argument("--checkpoint", default=None, metavar="DIR", help="a checkpoints/step_N folder (default: latest)")
    s.add_argument("--out", required=True, metavar="DIR", help="output model folder")
    s.add_argument("--tokenizer", default=None, metavar="DIR", help="tokenizer folder to copy alongside")
    s.set_defaults(func=cmd_export)

    s = stages.add_parser("pretrain", help="pre-train from scratch on token shards (muP, WSD, MTP)")
    s.add_argument("--data", required=True, metavar="DIR", help="token-shard folder (train.bin, val.bin, meta.json)")
    s.add_argument("--model-config", default="cpu-10m", metavar="PRESET|JSON",
                   help="model preset (cpu-10m, tiny, minicpm4-0.5b, minicpm4-8b) or a config.json; vocab and "
                        "BOS/EOS of a preset come from the data's meta.json (default: cpu-10m)")
    _common(s)
    s.set_defaults(func=cmd_pretrain)

    s = stages.add_parser("long", help="continue at a longer sequence length (LongRoPE; --sparse: InfLLM v2)")
    s.add_argument("--init", required=True, metavar="MODEL_DIR", help="HF model folder or a training run folder")
    s.add_argument("--data", required=True, metavar="DIR", help="token-shard folder")
    s.add_argument("--sparse", action="store_true", help="switch on InfLLM v2 sparse attention (sparse_config)")
    s.add_argument("--sparse-config", default=None, metavar="JSON",
                   help='sparse_config keys overriding the README defaults, e.g. \'{"window_size": 512, "topk": 8}\' '
                        "(small models train at short lengths, where the defaults would be all-dense)")
    s.add_argument("--trained-len", type=int, default=None,
                   help="sequence length the model was trained at (only used when it has no LongRoPE factors)")
    _common(s)
    s.set_defaults(func=cmd_long)

    s = stages.add_parser("sft", help="supervised fine-tuning on chat JSONL ({\"messages\": [...]}, loss on assistant turns)")
    s.add_argument("--init", required=True, metavar="MODEL_DIR", help="HF model folder or a training run folder")
    s.add_argument("--data", required=True, metavar="JSONL", help="training conversations")
    s.add_argument("--val-data", default=None, metavar="JSONL", help="validation conversations")
    _common(s)
    s.set_defaults(func=cmd_sft)

    s = stages.add_parser("qat", help="BitCPM4 ternary quantization-aware training from a high-precision model",
                          description="Ternary QAT (BitCPM4): start from --init, fake-quantize every decoder linear "
                          "(per-group absmean ternary, straight-through gradient), train with a fresh LR warmup "
                          "(default LR 5e-3), write RUN_DIR/final as the packed ternary model. Length: --steps, "
                          "--tokens, or by default 2x the decay-phase tokens of the run that wrote --init.")
    s.add_argument("--init", required=True, metavar="MODEL_DIR",
                   help="high-precision HF model folder or a training run folder")
    s.add_argument("--data", required=True, metavar="DIR",
                   help="token-shard folder (val.bin, when present, is evaluated)")
    s.add_argument("--group-size", type=int, default=None,
                   help="input channels per ternary scale (default 64; must divide every linear's input size; "
                        "0 = no quantizer: the same stage in float, a control run)")
    s.add_argument("--tokens", type=int, default=None,
                   help="training tokens instead of --steps (default: 2x the --init run's decay tokens)")
    _common(s)
    s.set_defaults(func=cmd_qat)

    s = stages.add_parser("draft", help="train the EAGLE-2 draft head of a frozen target (speculative decoding)",
                          description="Distil a one-layer EAGLE-2 draft from the frozen --model: KL to the target's "
                          "next-token distribution + smooth-L1 to its next hidden state, on its own output features "
                          "one step further too (train/draft.py). Writes RUN_DIR/final, a MiniCPM4 Eagle draft folder "
                          "for `--draft`. --init mtp:PATH starts from a pretraining run's MTP head.")
    s.add_argument("--model", required=True, metavar="MODEL_DIR",
                   help="the target: HF model folder or a training run folder")
    s.add_argument("--data", default=None, metavar="DIR", help="token-shard folder (train.bin; val.bin validates)")
    s.add_argument("--chat-data", default=None, metavar="JSONL",
                   help="chat conversations (pairs predicting assistant tokens)")
    s.add_argument("--val-chat-data", default=None, metavar="JSONL", help="validation conversations")
    s.add_argument("--out", required=True, metavar="RUN_DIR", help="run folder: checkpoints, metrics, final draft")
    s.add_argument("--init", default=None, metavar="random|mtp:PATH",
                   help="random (default) or the MTP head of a pretraining run (its folder, final/ or a checkpoint)")
    s.add_argument("--convert-mtp-only", action="store_true",
                   help="write the --init mtp:PATH head converted to RUN_DIR/final without training")
    s.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    s.add_argument("--steps", type=int, default=None, help="optimizer steps (default 1000)")
    g = s.add_argument_group("batch, optimizer and loss (default: DraftTrainConfig)")
    g.add_argument("--batch-size", type=int, default=None, help="rows per micro-batch (default 8)")
    g.add_argument("--grad-accum", type=int, default=None, help="micro-batches per optimizer step")
    g.add_argument("--seq-len", type=int, default=None, help="tokens per row, <= 1024 (the draft window; default 512)")
    g.add_argument("--lr", type=float, default=None, help="peak (muP base) learning rate (default 3e-3)")
    _schedule_options(g)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--kl-weight", type=float, default=None, help="weight of KL(target || draft) (default 1.0)")
    g.add_argument("--feature-weight", type=float, default=None, help="weight of the feature smooth-L1 (default 1.0)")
    g.add_argument("--unroll-weight", type=float, default=None,
                   help="weight of the unrolled depth-2 step (default 1.0; 0 = off)")
    g.add_argument("--no-unroll", action="store_true", help="no unrolled step (= --unroll-weight 0)")
    g.add_argument("--residual-scale", choices=["cpmcu", "vllm", "mtp"], default=None,
                   help="a random draft's residual scale convention (default cpmcu)")
    g = s.add_argument_group("run")
    g.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default=None,
                   help="autocast dtype (auto: bfloat16 on CUDA and AVX-512 CPUs)")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    g.add_argument("--eval-every", type=int, default=0, help="steps between validation runs (0: at the end)")
    g.add_argument("--eval-batches", type=int, default=None, help="validation micro-batches (default 8; 0 = all)")
    g.add_argument("--save-every", type=int, default=0, help="steps between checkpoints (0: at the end)")
    g.add_argument("--keep", type=int, default=3, help="checkpoints to keep")
    g.add_argument("--no-progress", action="store_true", help="no progress bar / step lines")
    s.set_defaults(func=cmd_draft)


def _schedule_options(g) -> None:
    """The WSD schedule and optimizer flags every stage shares (argparse default None: the stage's own default)."""
    g.add_argument("--warmup", type=int, default=None, help="warmup steps")
    g.add_argument("--decay", type=int, default=None, help="decay steps (the last steps of the run)")
    g.add_argument("--decay-shape", choices=["linear", "cosine", "exp", "1-sqrt"], default=None)
    g.add_argument("--min-lr-ratio", type=float, default=None, help="final LR / peak LR")
    g.add_argument("--weight-decay", type=float, default=None)
    g.add_argument("--grad-clip", type=float, default=None, help="max gradient norm (0 = off)")


def _common(s: argparse.ArgumentParser) -> None:
    s.add_argument("--out", required=True, metavar="RUN_DIR", help="run folder: checkpoints, metrics, final model")
    s.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    s.add_argument("--tokenizer", default=None, metavar="DIR", help="tokenizer folder (copied into RUN_DIR/final)")
    s.add_argument("--steps", type=int, default=None, help="optimizer steps (default 1000)")
    g = s.add_argument_group("batch and optimizer (default: the stage preset)")
    g.add_argument("--batch-size", type=int, default=None, help="sequences per micro-batch per process")
    g.add_argument("--grad-accum", type=int, default=None, help="micro-batches per optimizer step")
    g.add_argument("--seq-len", type=int, default=None)
    g.add_argument("--lr", type=float, default=None, help="peak (muP base) learning rate")
    _schedule_options(g)
    g.add_argument("--mtp-weight", type=float, default=None, help="λ of the MTP loss (0 = no MTP head)")
    g.add_argument("--parametrization", choices=["mup", "standard"], default=None)
    g.add_argument("--seed", type=int, default=None)
    g = s.add_argument_group("run")
    g.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default=None,
                   help="autocast dtype; auto (default) = bfloat16 on CUDA and AVX-512 CPUs, float32 elsewhere")
    g.add_argument("--compile", action="store_true", help="torch.compile the training module")
    g.add_argument("--parallel", choices=["auto", "none", "ddp", "fsdp"], default="auto",
                   help="under torchrun: DDP (auto) or FSDP2")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    g.add_argument("--eval-every", type=int, default=0, help="steps between validation runs (0: at the end)")
    g.add_argument("--eval-batches", type=int, default=None, help="validation micro-batches per process")
    g.add_argument("--save-every", type=int, default=0, help="steps between checkpoints (0: at the end)")
    g.add_argument("--keep", type=int, default=3, help="checkpoints to keep")
    g.add_argument("--peak-tflops", type=float, default=None, help="per-device peak for MFU (default: measured)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar / step lines")
    g.add_argument("--no-document-mask", action="store_true", help="let attention cross packed documents")


# ---- shared plumbing ---------------------------------------------------------------------------------

def _overrides(args: argparse.Namespace) -> dict:
    out = {field: getattr(args, flag) for flag, field in TRAIN_FLAGS.items() if getattr(args, flag, None) is not None}
    out.update(out_dir=str(args.out), parallel=args.parallel, device=args.device, eval_every=args.eval_every,
               save_every=args.save_every, keep_last=args.keep, compile=args.compile, progress=not args.no_progress,
               peak_flops=None if args.peak_tflops is None else args.peak_tflops * 1e12)
    if args.no_document_mask:
        out["document_mask"] = False
    return out


def _resume_checkpoint(args: argparse.Namespace) -> Path | None:
    """The checkpoint a run continues from: the latest in --out with --resume; None when --out has none; an
    error when it has one and --resume was not given (never clobber a run)."""
    from minicpm4.train.checkpointing import latest_checkpoint

    latest = latest_checkpoint(args.out)
    if latest is None:
        if args.resume:
            print(f"note: --resume: no checkpoint in {args.out}, starting from scratch", file=sys.stderr)
        return None
    if not args.resume:
        raise UserError(f"--out {args.out} already holds checkpoints ({latest.name}): pass --resume to continue "
                        "or choose another --out")
    return latest


def _merge_saved(args: argparse.Namespace, cfg, saved, flags: dict[str, str], given: dict):
    """The saved config with the free run flags of `cfg` (RESUME_FREE); an explicit flag that contradicts it fails."""
    for flag, field in flags.items():
        if field in given and field not in RESUME_FREE and given[field] != getattr(saved, field):
            raise UserError(f"--{flag.replace('_', '-')} {given[field]} differs from the checkpoint's "
                            f"{getattr(saved, field)}; a resumed run keeps its settings")
    free = {k: v for k, v in dataclasses.asdict(cfg).items() if k in RESUME_FREE}
    if args.steps is None and getattr(args, "tokens", None) is None:
        free.pop("steps")
    if args.decay is None:  # never a preset's default: only an explicit --decay changes the saved schedule
        free.pop("decay_steps")
    return dataclasses.replace(saved, **free)


def _resumed(args: argparse.Namespace, model_config, cfg):
    """With --resume and a checkpoint in --out: the checkpoint's configs (+ the free run flags); else as given."""
    from minicpm4.config import MiniCPMConfig
    from minicpm4.train.checkpointing import read_train_state
    from minicpm4.train.trainer import TrainConfig

    latest = _resume_checkpoint(args)
    if latest is None:
        return model_config, cfg, False
    state = read_train_state(latest)
    saved = TrainConfig.from_dict(state.train_config)
    merged = _merge_saved(args, cfg, saved, TRAIN_FLAGS, _overrides(args))
    return MiniCPMConfig.from_dict(state.model_config), merged, True


def _model_dir(path: str, flag: str = "--init") -> Path:
    p = Path(path)
    for candidate in (p, p / "final"):
        if (candidate / "config.json").is_file():
            return candidate
    raise UserError(f"{flag} {path}: no config.json there or in {p / 'final'}")


def _tokenizer_dir(args: argparse.Namespace, *candidates: Path | None) -> Path | None:
    from minicpm4.train.trainer import TOKENIZER_FILES

    if args.tokenizer is not None:
        if not Path(args.tokenizer).is_dir():
            raise UserError(f"--tokenizer {args.tokenizer}: not a folder")
        return Path(args.tokenizer)
    for c in candidates:
        if c is not None and any((c / f).is_file() for f in TOKENIZER_FILES[:2]):
            return c
    return None


def _run(args, model_config, cfg, train_data, val_data=None, init_model=None, tokenizer_dir=None) -> None:
    from minicpm4.train.distributed import cleanup
    from minicpm4.train.trainer import export_final, train

    model_config, cfg, resuming = _resumed(args, model_config, cfg)
    if train_data.seq_len != cfg.seq_len:
        raise UserError(f"--seq-len {train_data.seq_len} differs from the checkpoint's {cfg.seq_len}")
    result = train(model_config, cfg, train_data, val_data, None if resuming else init_model, resume=resuming)
    final = export_final(result, Path(cfg.out_dir) / "final", tokenizer_dir)
    if final is not None:
        msg = f"{cfg.stage}: {result.step} steps"
        if result.losses:
            msg += f", last loss {result.losses[-1]:.4f}"
        if result.val:
            msg += ", " + ", ".join(f"{k} {v:.4f}" for k, v in result.val.items())
        if result.tokens_per_s:
            msg += f", {result.tokens_per_s:,.0f} tokens/s, MFU {100 * result.mfu:.1f}%"
        print(f"{msg}\nmodel: {final}" + ("" if tokenizer_dir else " (no tokenizer found: pass --tokenizer)"))
    cleanup(result.info)


def _token_data(folder: str, seq_len: int):
    """(train, val or None) token windows of a shard folder; val only when val.bin holds a window."""
    from minicpm4.train.data import TokenWindows

    train_data = TokenWindows.from_folder(folder, "train", seq_len)
    val_data = TokenWindows.from_folder(folder, "val", seq_len) if (Path(folder) / "val.bin").is_file() else None
    return train_data, (val_data if val_data is not None and len(val_data) else None)


def _steps(args: argparse.Namespace) -> int:
    steps = 1000 if args.steps is None else args.steps
    if steps < 1:
        raise UserError(f"--steps must be >= 1, got {steps}")
    return steps


# ---- stages ------------------------------------------------------------------------------------------

def cmd_pretrain(args: argparse.Namespace) -> None:
    from minicpm4.config import read_config
    from minicpm4.train import stages
    from minicpm4.train.data import read_meta

    meta = read_meta(args.data)
    if args.model_config in stages.MODEL_PRESETS or not Path(args.model_config).exists():
        ids = {"vocab_size": meta["vocab_size"]}
        ids.update({k: meta[k] for k in ("bos_token_id", "eos_token_id") if meta.get(k) is not None})
        if args.model_config in stages.MODEL_PRESETS:
            model_config = stages.MODEL_PRESETS[args.model_config](**ids)
        else:
            model_config = read_config(args.model_config).replace(**ids)
    else:
        model_config = read_config(args.model_config)
        if model_config.vocab_size < meta["vocab_size"]:
            raise UserError(f"--model-config: vocab_size {model_config.vocab_size} < the data's {meta['vocab_size']}")
    overrides = _overrides(args)
    model_config, cfg = stages.pretrain(model_config, steps=_steps(args), **overrides)
    train_data, val_data = _token_data(args.data, cfg.seq_len)
    tok = meta.get("tokenizer")  # the folder as given to `minicpm4 data` (absolute, or relative to its cwd)
    candidates = [Path(args.data)] + ([Path(tok), Path(args.data) / tok] if isinstance(tok, str) else [])
    _run(args, model_config, cfg, train_data, val_data, tokenizer_dir=_tokenizer_dir(args, *candidates))


def cmd_long(args: argparse.Namespace) -> None:
    from minicpm4.checkpoint import load_model
    from minicpm4.train import stages

    init_dir = _model_dir(args.init)
    init_model = load_model(init_dir, dtype=__import__("torch").float32)
    overrides = _overrides(args)
    seq_len = overrides.pop("seq_len", 32768)
    sparse_config = None
    if args.sparse_config is not None:
        import json

        from minicpm4.config import SparseConfig

        try:
            sparse_config = SparseConfig.from_dict(json.loads(args.sparse_config))
        except json.JSONDecodeError as e:
            raise ValueError(f"--sparse-config: not valid JSON ({e})") from None
    model_config, cfg = stages.long_context(init_model.config, seq_len=seq_len, sparse=args.sparse or sparse_config is not None,
                                            steps=_steps(args), trained_len=args.trained_len,
                                            sparse_config=sparse_config, **overrides)
    train_data, val_data = _token_data(args.data, cfg.seq_len)
    _run(args, model_config, cfg, train_data, val_data, init_model, _tokenizer_dir(args, init_dir, Path(args.data)))


def cmd_sft(args: argparse.Namespace) -> None:
    import torch

    from minicpm4.checkpoint import load_model
    from minicpm4.tokenizer import Tokenizer
    from minicpm4.train import stages
    from minicpm4.train.sft_data import load_sft

    init_dir = _model_dir(args.init)
    tokenizer_dir = _tokenizer_dir(args, init_dir)
    if tokenizer_dir is None:
        raise UserError(f"sft needs a tokenizer: none in {init_dir}; pass --tokenizer DIR")
    tokenizer = Tokenizer.from_pretrained(tokenizer_dir)
    init_model = load_model(init_dir, dtype=torch.float32)
    model_config, cfg = stages.sft(init_model.config, steps=_steps(args), **_overrides(args))
    train_data = load_sft(args.data, tokenizer, cfg.seq_len)
    val_data = load_sft(args.val_data, tokenizer, cfg.seq_len) if args.val_data else None
    for name, packed in (("--data", train_data), ("--val-data", val_data)):
        top = max(int(row[0].max()) for row in packed.rows) if packed is not None else -1
        if top >= model_config.vocab_size:
            raise UserError(f"{name}: token id {top} is outside the model's vocab_size {model_config.vocab_size} "
                            "(tokenizer and model do not match)")
    st = train_data.stats
    print(f"sft data: {st.conversations} conversations -> {st.rows} rows of {cfg.seq_len + 1} tokens "
          f"({st.trained_tokens} trained tokens; {st.truncated} truncated, {st.dropped} dropped)", file=sys.stderr)
    _run(args, model_config, cfg, train_data, val_data, init_model, tokenizer_dir)


def _qat_length(args: argparse.Namespace, init_dir: Path) -> dict:
    """stages.qat's length keyword: --steps, --tokens, else 2x the decay tokens of the run that wrote init_dir."""
    from minicpm4.train import qat
    from minicpm4.train.checkpointing import latest_checkpoint

    if args.steps is not None:
        return {"steps": _steps(args)}
    if args.tokens is not None:
        if args.tokens < 1:
            raise UserError(f"--tokens must be >= 1, got {args.tokens}")
        return {"tokens": args.tokens}
    tokens = qat.default_tokens(init_dir)
    if tokens is not None:
        print(f"qat: {tokens:,} tokens, {qat.TOKENS_PER_DECAY_TOKEN}x the decay-phase tokens of the run that wrote "
              f"{init_dir}", file=sys.stderr)
        return {"tokens": tokens}
    if args.resume and latest_checkpoint(args.out) is not None:
        return {"steps": 1}  # a placeholder: a resumed run keeps its checkpoint's steps (_resumed)
    raise UserError(f"--init {args.init}: not the final model of a training run here, so its decay-phase tokens are "
                    "unknown; pass --tokens N (BitCPM4: about 2x the decay tokens of the original run) or --steps N")


def cmd_qat(args: argparse.Namespace) -> None:
    import os

    import torch

    from minicpm4.checkpoint import load_model
    from minicpm4.train import stages

    init_dir = _model_dir(args.init)
    init_model = load_model(init_dir, dtype=torch.float32)
    if "quantization_config" in init_model.config.extra:
        raise UserError(f"--init {init_dir} is already quantized "
                        f"({init_model.config.extra['quantization_config'].get('quant_method')}); "
                        "QAT starts from the high-precision model")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's; the token budget counts every rank's batch
    model_config, cfg = stages.qat(init_model.config, world_size=world_size, **_qat_length(args, init_dir),
                                   **_overrides(args))
    train_data, val_data = _token_data(args.data, cfg.seq_len)
    _run(args, model_config, cfg, train_data, val_data, init_model, _tokenizer_dir(args, init_dir, Path(args.data)))


def cmd_export(args: argparse.Namespace) -> None:
    """Rebuild the training module from the checkpoint's own configs, load it, export like a finished run."""
    from minicpm4.config import MiniCPMConfig
    from minicpm4.train.checkpointing import latest_checkpoint, load_checkpoint, read_train_state
    from minicpm4.train.distributed import DistInfo
    from minicpm4.train.trainer import TrainConfig, TrainResult, build_train_module, export_final

    path = Path(args.checkpoint) if args.checkpoint else latest_checkpoint(args.run)
    if path is None or not (path / "train_state.json").is_file():
        raise UserError(f"{args.checkpoint or args.run}: no checkpoint found")
    state = read_train_state(path)
    if state.extra.get("stage") == "draft":  # a draft run: its checkpoint is the draft head alone
        from minicpm4.train.draft import export_checkpoint

        step, out = export_checkpoint(path, args.out)
        print(f"exported draft step {step} of {args.run} to {out}")
        return
    config = MiniCPMConfig.from_dict(state.model_config)
    cfg = TrainConfig.from_dict(state.train_config)
    module = build_train_module(config, cfg)  # the checkpoint's config already carries its parametrisation
    load_checkpoint(path, module, None, DistInfo())
    out = export_final(TrainResult(step=state.step, module=module, info=DistInfo()), args.out,
                       _tokenizer_dir(args, Path(args.run) / "final", Path(args.run)))
    print(f"exported step {state.step} of {args.run} to {out}")


def _draft_flag_error(e: ValueError) -> UserError:
    """DraftTrainConfig.validate names the field; on the command line, name the flag."""
    msg = str(e)
    for flag, field in sorted(DRAFT_FLAGS.items(), key=lambda kv: -len(kv[1])):
        if msg.startswith(field + " ") or msg.startswith(field + ":"):
            return UserError(f"--{flag.replace('_', '-')}{msg[len(field):]}")
    return UserError(msg)


def cmd_draft(args: argparse.Namespace) -> None:
    from minicpm4.train import draft
    from minicpm4.train.checkpointing import read_train_state

    if args.no_unroll:
        if args.unroll_weight not in (None, 0):
            raise UserError("--no-unroll contradicts --unroll-weight; give one of them")
        args.unroll_weight = 0.0
    given = {field: getattr(args, flag) for flag, field in DRAFT_FLAGS.items() if getattr(args, flag) is not None}
    given["model"] = str(_model_dir(args.model, "--model"))
    given.update(out_dir=str(args.out), device=args.device, eval_every=args.eval_every, save_every=args.save_every,
                 keep_last=args.keep, progress=not args.no_progress)
    if args.steps is not None:
        given["steps"] = args.steps
    for name, path in (("--data", args.data), ("--chat-data", args.chat_data), ("--val-chat-data", args.val_chat_data)):
        if path is not None and not Path(path).exists():
            raise UserError(f"{name} {path}: no such file or folder")
    cfg = draft.DraftTrainConfig(**given)
    if args.convert_mtp_only:
        if not cfg.init.startswith("mtp:"):
            raise UserError("--convert-mtp-only needs --init mtp:PATH")
        print(f"draft converted from the MTP head of {cfg.init[4:]}: {draft.convert_mtp(cfg)}")
        return
    if cfg.data is None and cfg.chat_data is None:
        raise UserError("give training data: --data (token shards) and/or --chat-data (chat JSONL)")
    latest = _resume_checkpoint(args)
    if latest is not None:
        saved = draft.DraftTrainConfig.from_dict(read_train_state(latest).train_config)
        cfg = _merge_saved(args, cfg, saved, DRAFT_FLAGS, given)
    try:
        cfg.validate()
    except ValueError as e:
        raise _draft_flag_error(e) from None
    result = draft.train_draft(cfg, resume=latest is not None)
    final = draft.finish(result, cfg)
    msg = f"draft: {result.step} steps"
    if result.losses:
        msg += f", last loss {result.losses[-1]:.4f}, top-1 agreement {result.agree[-1]:.3f}"
    if result.val:
        msg += f", validation agreement {result.val['val_agree']:.3f}"
        if "val_agree_2" in result.val:
            msg += f" (depth 2: {result.val['val_agree_2']:.3f})"
    if result.tokens_per_s:
        msg += f", {result.tokens_per_s:,.0f} tokens/s"
    print(f"{msg}\ndraft: {final}")
