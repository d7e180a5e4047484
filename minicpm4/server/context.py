"""What every handler needs, built once by create_app and kept on app.state.ctx."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from minicpm4.engine import AsyncLLM
from minicpm4.server.logprobs import TokenTexts
from minicpm4.server.metrics import ServerMetrics
from minicpm4.tokenizer import Tokenizer


@dataclass
class ServerContext:
    llm: AsyncLLM
    tokenizer: Tokenizer
    model_name: str
    # sampling defaults for fields a request leaves out (api.generation_defaults of the model folder)
    defaults: dict[str, Any]
    metrics: ServerMetrics
    texts: TokenTexts
    # a chat request without max_tokens may write up to this many tokens (CPM.cu's server default, §4.7),
    # never past the context; completions default to OpenAI's 16
    default_chat_max_tokens: int = 1024
    created: int = field(default_factory=lambda: int(time.time()))
    draining: bool = False  # set at shutdown: new calls get 503 while the running ones finish

    @property
    def max_model_len(self) -> int:
        return self.llm.max_model_len
