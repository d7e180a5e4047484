"""InfLLM v2: trainable block-sparse attention (MINICPM4.md §3)."""
