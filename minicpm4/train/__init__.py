"""Training: pretraining (muP + WSD + MTP), long-context (LongRoPE, optional InfLLM v2), SFT, ternary QAT.

    from minicpm4.train import TrainConfig, train, stages
    model_cfg, cfg = stages.pretrain(tiny(), out_dir="runs/x", steps=100)
    train(model_cfg, cfg, TokenWindows.from_folder("shards", "train", cfg.seq_len))

Modules: schedule (WSD), mup (init + LR groups, SP switch), mtp (MTP head), losses (token-normalised CE),
data (packed token windows, resumable sampling), sft_data (ChatML + assistant-only mask, packing),
checkpointing (atomic, DCP-sharded), distributed (DDP/FSDP2),
metrics (MFU, JSONL, plot, progress), trainer (the loop), stages (presets), qat (BitCPM4 ternary QAT hooks),
cli (`minicpm4 train ...`).
Heavy imports stay in the submodules; this package imports nothing at load time.
"""

__all__ = ["TrainConfig", "train"]


def __getattr__(name: str):
    if name in __all__:
        from minicpm4.train import trainer

        return getattr(trainer, name)
    raise AttributeError(name)
