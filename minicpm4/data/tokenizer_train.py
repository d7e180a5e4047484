"""Train a byte-level BPE tokenizer (HF `tokenizers`) on the corpus and save it as a standard HF folder.

The folder (tokenizer.json, tokenizer_config.json, special_tokens_map.json) loads with
`minicpm4.tokenizer.Tokenizer.from_pretrained` and with transformers' AutoTokenizer. MiniCPM4's special
tokens come first, so their ids are fixed whatever the corpus (MINICPM4.md §2.5 lists the same tokens at
73440+ in the real 73,448-token vocabulary; here they are packed at the start):

    0 <unk>   1 <s> (BOS)   2 </s>   3 <|im_end|>   4 <|im_start|>   5 <|tool_call|>
    6 <|execute_start|>   7 <|execute_end|>   8 <|fim_prefix|>   9 <|fim_middle|>   10 <|fim_suffix|>

A model trained with it uses bos_token_id 1 and eos_token_id [2, 3] (the real model's [2, 73440]).
Like MiniCPM4's: BOS is added by encode (the tokenizer.json post-processor prepends it), the chat template
is ChatML and emits no BOS, and tokenizer_config.json's eos_token is <|im_end|>, the end of a chat turn.
Byte-level (GPT-2 style) instead of MiniCPM4's SentencePiece with byte fallback: every string encodes
without <unk>, and the `tokenizers` trainer needs nothing else.
"""

from __future__ import annotations

import json
from pathlib import Path

from minicpm4.io import write_text_atomic
from minicpm4.data import progress
from minicpm4.data.corpus import iter_corpus
from minicpm4.tokenizer import CHATML_TEMPLATE

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<|im_end|>", "<|im_start|>", "<|tool_call|>", "<|execute_start|>",
                  "<|execute_end|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>")
BOS, DOC_EOS, CHAT_EOS = "<s>", "</s>", "<|im_end|>"


def train_tokenizer(corpus_dir: str | Path, out_dir: str | Path, vocab_size: int = 8192, min_frequency: int = 2,
                    show_progress: bool = True) -> Path:
    """Train on corpus_dir/train.jsonl (never on validation text) and write the HF files to out_dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"vocab_size must be at least {len(SPECIAL_TOKENS) + 256} "
                         f"(special tokens + 256 byte symbols), got {vocab_size}")
    texts = (doc.text for doc in progress(iter_corpus(corpus_dir, "train"), desc="tokenizer train", unit="doc",
                                          disable=not show_progress))
    backend = Tokenizer(models.BPE())  # no unk_token: byte-level covers every input
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2 split regex + byte map
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=show_progress,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer=trainer)
    for i, token in enumerate(SPECIAL_TOKENS):
        assert backend.token_to_id(token) == i, f"special token {token} got id {backend.token_to_id(token)}, not {i}"
    bos = SPECIAL_TOKENS.index(BOS)
    # Our Tokenizer (and transformers) read "add BOS" off this post-processor; $B is for sentence pairs.
    backend.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                           special_tokens=[(BOS, bos)])
    save_folder(backend, Path(out_dir))
    return Path(out_dir)


def save_folder(backend, out: Path) -> None:
    """tokenizer.json + tokenizer_config.json + special_tokens_map.json, each written atomically."""
    write_text_atomic(out / "tokenizer.json", backend.to_str(pretty=True))
    decoder = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                        "special": True} for i, t in enumerate(SPECIAL_TOKENS)}
    extra = [t for t in SPECIAL_TOKENS if t not in ("<unk>", BOS, DOC_EOS)]
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": BOS,
        "eos_token": CHAT_EOS,
        "unk_token": "<unk>",
        "pad_token": None,
        "additional_special_tokens": extra,
        "added_tokens_decoder": decoder,
        "chat_template": CHATML_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000_000,  # the model config decides the context, not the tokenizer
    }
    write_text_atomic(out / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    special_map = {"bos_token": BOS, "eos_token": CHAT_EOS, "unk_token": "<unk>", "additional_special_tokens": extra}
    write_text_atomic(out / "special_tokens_map.json", json.dumps(special_map, indent=2) + "\n")
