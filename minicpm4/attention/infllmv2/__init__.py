"""InfLLM v2: trainable block-sparse attention (MINICPM4.md §3).

compress.py (C1/C2 mean-pooled keys) -> selection.py (stage 1: scores, group sum, max-pool, top-k)
-> sparse_attention.py (stage 2: spec + dispatch; blocksparse.py is the fast path with its backward).
settings.py turns a checkpoint's sparse_config into InfLLMv2Settings through a named budget variant.
"""

from minicpm4.attention.infllmv2.compress import compress_keys, num_windows
from minicpm4.attention.infllmv2.selection import select_blocks, select_blocks_reference
from minicpm4.attention.infllmv2.settings import BUDGET_VARIANTS, InfLLMv2Settings, settings_from_config
from minicpm4.attention.infllmv2.sparse_attention import (
    infllmv2_attention,
    sparse_attention,
    sparse_attention_reference,
    stage2_mask,
)

__all__ = [
    "BUDGET_VARIANTS", "InfLLMv2Settings", "compress_keys", "infllmv2_attention", "num_windows", "select_blocks",
    "select_blocks_reference", "settings_from_config", "sparse_attention", "sparse_attention_reference", "stage2_mask",
]
