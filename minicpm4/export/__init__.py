"""Exporters to other runtimes' formats. GGUF (llama.cpp) first; quantized types come later."""

from minicpm4.export.gguf import (
    OUT_TYPES,
    export_gguf,
    export_model,
    export_model_dir,
    gguf_name_map,
    permute_qk,
    unpermute_qk,
)

__all__ = ["OUT_TYPES", "export_gguf", "export_model", "export_model_dir", "gguf_name_map", "permute_qk", "unpermute_qk"]
