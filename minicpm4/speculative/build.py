"""Build the drafter a SpeculativeConfig describes, for a loaded target model."""

from __future__ import annotations

from minicpm4.model import MiniCPMForCausalLM
from minicpm4.speculative.config import SpeculativeConfig


def build_drafter(target: MiniCPMForCausalLM, config: SpeculativeConfig, context_len: int):
    """An EagleDrafter (mode "eagle") or a ChainDrafter (mode "chain"); both offer observe / draft_tree / drop."""
    frspec_ids = None
    if config.frspec is not None:
        from minicpm4.data.frspec import load_frspec_index

        frspec_ids = load_frspec_index(config.frspec, config.frspec_size)
        if int(frspec_ids.max()) >= target.config.vocab_size or int(frspec_ids.min()) < 0:
            raise ValueError(f"frspec: {config.frspec} holds ids outside the target's vocabulary "
                             f"(0 .. {target.config.vocab_size - 1})")
    if config.mode == "chain":
        from minicpm4.speculative.chain import ChainDrafter

        return ChainDrafter.from_folder(target, config.draft, config.shape, context_len)
    from minicpm4.speculative.draft_model import load_draft
    from minicpm4.speculative.eagle import EagleDrafter

    draft = load_draft(config.draft, target.config, dtype=target.dtype)
    return EagleDrafter(target, draft, config.shape, frspec_ids, config.window, context_len)
