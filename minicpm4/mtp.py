"""Multi-token prediction head (MINICPM4.md §6.4, TR §2.3.2), a module beside the model, not inside it.
It lives at the package top level because pretraining trains it and speculative decoding drafts with it.

With h_i the main model's final hidden state at position i and x the token ids:
    ĥ_i   = concat(Norm(h_i), Norm(Emb(x_{i+1})))          [B, T-1, 2H]
    h^MTP = Norm_final(DecoderLayer(Linear_{2H->H}(ĥ)))     [B, T-1, H]
    L_MTP = mean_i CE(OutputHead(h^MTP_i), x_{i+2})
    L     = L_NTP + λ L_MTP                                  (λ is not published; `mtp_weight` in TrainConfig)
The embedding and the output head (model.logits: the 1/width_mult muP divisor and the tied or untied
head) are the main model's, shared as the report says. The layer is model.DecoderLayer, so it uses the
main model's RoPE and attention backend.

Input order: the TR writes the hidden state first; the released EAGLE draft weights concatenate the
embedding first (MINICPM4.md §6.4, §11.1 item 4). `embed_first=True` selects the draft's order, so a
head trained here can seed a speculative draft without permuting the projection's columns.
h_i is the post-final-norm hidden state (what model.hidden_states returns); which one the report
used is not published (§11.2), and Norm(h_i) makes the two nearly equivalent.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from minicpm4.attention.document_mask import document_metadata
from minicpm4.config import MiniCPMConfig
from minicpm4.model import DecoderLayer, MiniCPMForCausalLM, RMSNorm


class MTPHead(nn.Module):
    def __init__(self, config: MiniCPMConfig, embed_first: bool = False) -> None:
        super().__init__()
        h = config.hidden_size
        self.embed_first = embed_first
        self.hidden_norm = RMSNorm(h, config.rms_norm_eps)
        self.embed_norm = RMSNorm(h, config.rms_norm_eps)
        self.proj = nn.Linear(2 * h, h, bias=False)
        # layer_idx one past the main stack: a backend that keeps per-layer state never collides.
        self.layer = DecoderLayer(config, config.num_hidden_layers)
        self.norm = RMSNorm(h, config.rms_norm_eps)

    def forward(self, model: MiniCPMForCausalLM, hidden: torch.Tensor, input_ids: torch.Tensor,
                positions: torch.Tensor, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [B, T, H] (main model, final-normed), input_ids/positions [B, T] -> h^MTP [B, T-1, H].

        Row i of the result predicts x_{i+2}, i.e. labels[:, i+1] in the trainer's shifted layout.
        `segment_ids` (packed documents) must describe the T-1 MTP positions (the trainer passes
        segment_ids[:, 1:]: row i belongs to the document of x_{i+1}).
        """
        h = self.hidden_norm(hidden[:, :-1])  # h_i, i = 0 .. T-2
        e = self.embed_norm(model.model.embed_tokens(input_ids[:, 1:]))  # Emb(x_{i+1})
        x = self.proj(torch.cat([e, h] if self.embed_first else [h, e], dim=-1))  # [B, T-1, H]
        pos = positions[:, :-1]
        cos, sin = model.rotary(pos, int(positions.max()) + 1)  # same LongRoPE table as the main pass
        meta = document_metadata(pos, segment_ids)
        x = self.layer(x, cos, sin, meta, model.attention_backend)
        return self.norm(x)
