"""MiniCPM4 tokenizer: load a HF tokenizer folder, encode/decode, render ChatML, stream-decode.

Parity target is transformers 5 (`AutoTokenizer.from_pretrained(folder)`), which never runs SentencePiece on
text: it converts a Llama-style `tokenizer.model` into a `tokenizers` BPE (vocab = the pieces, merges generated
from the vocab) and encodes with that. We build the same backend, so three things differ from raw sentencepiece:
  1. `legacy: true` -> Metaspace prepend_scheme "always": EVERY text chunk between special tokens gets a "▁"
     unless it starts with a space: "<|im_end|>\n" -> [73440, 59320 "▁", 5 "\n"]. (MiniCPM4's .model says
     add_dummy_prefix=false; transformers ignores that.) `legacy: false` -> only at the start of the text.
  2. SentencePiece user-defined symbols ("...", "<SEP>", ...) are not atomic: "..." -> "." "." ".".
  3. decode strips one leading space if the text starts with one: "▁Hi" -> "Hi", but "<s>▁Hi" -> "<s> Hi".
BOS is prepended here after tokenization, when `add_bos_token` is true (tokenizer.model) or the tokenizer.json
post-processor adds one; MiniCPM4's chat template emits none (MINICPM4.md §2.5).
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as _Backend

# ChatML, byte-identical to MiniCPM4's tokenizer_config.json; used when a folder ships no template.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_SPM_BPE = 2  # sentencepiece TrainerSpec.ModelType.BPE


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _content(token: Any) -> str | None:
    """Config files spell a token as "<s>" or as {"content": "<s>", ...}."""
    return token.get("content") if isinstance(token, dict) else token


def _added_tokens(config: dict[str, Any], added_json: dict[str, Any]) -> dict[int, AddedToken]:
    """id -> AddedToken from added_tokens_decoder (authoritative flags), then added_tokens.json (ids only)."""
    named_special = {_content(config.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    named_special |= {_content(t) for t in config.get("additional_special_tokens") or []}
    out: dict[int, AddedToken] = {}
    for key, spec in (config.get("added_tokens_decoder") or {}).items():
        spec = spec if isinstance(spec, dict) else {"content": spec, "special": True}
        flags = {k: spec.get(k, False) for k in ("single_word", "lstrip", "rstrip", "normalized", "special")}
        out[int(key)] = AddedToken(spec["content"], **flags)
    for content, idx in added_json.items():
        out.setdefault(int(idx), AddedToken(content, normalized=False, special=content in named_special))
    return out


def _backend_from_sentencepiece(path: Path, legacy: bool, add_prefix_space: bool) -> _Backend:
    """The BPE backend transformers 5 builds for a SentencePiece LlamaTokenizer (see module docstring)."""
    try:  # the proto, not SentencePieceProcessor: we need the model type and all pieces, like transformers
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as e:
        raise ImportError(f"reading {path} needs `protobuf` (pip install protobuf): {e}") from e
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as e:  # protobuf raises its own DecodeError type
        raise ValueError(f"{path} is not a readable SentencePiece model: {e}") from e
    if proto.trainer_spec.model_type != _SPM_BPE or not proto.pieces:
        raise ValueError(f"{path}: only SentencePiece BPE models are supported (MiniCPM4's is BPE)")
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    # Merge ranks = id of the merged piece, then shorter left half first: transformers' generate_merges order.
    merges = [(w[:k], w[k:]) for w in vocab for k in range(1, len(w)) if w[:k] in vocab and w[k:] in vocab]
    backend = _Backend(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None))
    scheme = ("always" if legacy else "first") if add_prefix_space else "never"
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if add_prefix_space else []))
    return backend


def _register(backend: _Backend, added: dict[int, AddedToken], where: Path) -> None:
    """Add special/added tokens in id order; each must land on the id the config names (new ones get the next
    free id), else the folder's files disagree and every id after it would be wrong."""
    for idx, token in sorted(added.items()):
        (backend.add_special_tokens if token.special else backend.add_tokens)([token])
        if (got := backend.token_to_id(token.content)) != idx:
            raise ValueError(f"{where}: added token {token.content!r} got id {got}, the config says {idx}")


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    # Same environment as transformers' apply_chat_template: sandboxed, trim_blocks + lstrip_blocks.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{i}] must be a dict, got {type(message).__name__}")
        for field in ("role", "content"):
            if field not in message:
                raise ValueError(f"messages[{i}] has no {field!r} field")
            if not isinstance(message[field], str):
                raise ValueError(f"messages[{i}][{field!r}] must be a str, got {type(message[field]).__name__}")


class Tokenizer:
    """A `tokenizers` backend plus the tokenizer_config.json facts that transformers layers on top of it."""

    def __init__(
        self, backend: _Backend, config: dict[str, Any], add_bos: bool | None = None, chat_template: str | None = None
    ) -> None:
        """add_bos=None: add BOS exactly when the backend's post-processor would (a bare BPE adds nothing)."""
        self._backend = backend
        self._plain: _Backend | None = None  # copy that treats special-token text as plain text
        self.config = config
        self.chat_template: str = chat_template or CHATML_TEMPLATE
        vocab = backend.get_vocab(with_added_tokens=True)
        self.vocab_size: int = max(vocab.values()) + 1  # not len(): added-token ids may leave gaps
        self.special_token_ids: dict[str, int] = {
            t.content: i for i, t in backend.get_added_tokens_decoder().items() if t.special
        }
        self.bos_token: str | None = _content(config.get("bos_token"))
        self.eos_token: str | None = _content(config.get("eos_token"))
        self.bos_token_id: int | None = None if self.bos_token is None else backend.token_to_id(self.bos_token)
        self.eos_token_id: int | None = None if self.eos_token is None else backend.token_to_id(self.eos_token)
        for token, idx in ((self.bos_token, self.bos_token_id), (self.eos_token, self.eos_token_id)):
            if token is not None and idx is None:
                raise ValueError(f"tokenizer_config.json names {token!r} as bos/eos_token; it is not in the vocabulary")
        if add_bos is None:
            ids = backend.encode("", add_special_tokens=True).ids
            add_bos = bool(ids) and ids[0] == self.bos_token_id
        self.add_bos: bool = add_bos

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        """Load tokenizer.json (preferred) or tokenizer.model, plus tokenizer_config.json and friends."""
        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"tokenizer folder not found: {folder}")
        config_path = folder / "tokenizer_config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"missing {config_path}")
        config = _read_json(config_path)
        if (folder / "special_tokens_map.json").is_file():
            for key, value in _read_json(folder / "special_tokens_map.json").items():
                config.setdefault(key, value)  # tokenizer_config.json wins on conflicts, as in transformers
        added_json = _read_json(folder / "added_tokens.json") if (folder / "added_tokens.json").is_file() else {}

        if (folder / "tokenizer.json").is_file():
            # transformers 5 drops add_bos_token/add_eos_token when tokenizer.json exists: its post-processor
            # decides. We read BOS off that post-processor and add it ourselves (any suffix it adds is not used).
            add_bos = None
            try:
                backend = _Backend.from_file(str(folder / "tokenizer.json"))
            except Exception as e:  # the Rust side raises a bare Exception
                raise ValueError(f"cannot read {folder / 'tokenizer.json'}: {e}") from e
        elif (folder / "tokenizer.model").is_file():
            # transformers 5 LlamaTokenizer defaults: legacy=False, add_prefix_space=True when unset.
            add_bos = bool(config.get("add_bos_token", True))
            add_prefix_space = config.get("add_prefix_space")
            backend = _backend_from_sentencepiece(
                folder / "tokenizer.model",
                legacy=bool(config.get("legacy", False)),
                add_prefix_space=True if add_prefix_space is None else bool(add_prefix_space),
            )
        else:
            raise FileNotFoundError(f"no tokenizer.json or tokenizer.model in {folder}")
        _register(backend, _added_tokens(config, added_json), config_path)

        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": "..."}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if (folder / "chat_template.jinja").is_file():  # transformers 5 saves it apart and prefers it
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        return cls(backend, config, add_bos=add_bos, chat_template=template)

    # -- text <-> ids -------------------------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool | None = None, allow_special: bool = True) -> list[int]:
        """Ids of `text`, equal to transformers' `tok(text)["input_ids"]` with the default arguments.

        allow_special=False encodes "<|im_start|>" etc. as ordinary text (transformers' split_special_tokens=True);
        use it for untrusted user content so it cannot forge chat-control tokens.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        ids = (self._backend if allow_special else self._plain_backend()).encode(text, add_special_tokens=False).ids
        if self.add_bos if add_bos is None else add_bos:
            if self.bos_token_id is None:
                raise ValueError("add_bos=True but tokenizer_config.json names no bos_token")
            ids.insert(0, self.bos_token_id)
        return ids

    def _plain_backend(self) -> _Backend:
        if self._plain is None:  # a separate copy: flipping the flag on the shared backend would not be thread-safe
            self._plain = _Backend.from_str(self._backend.to_str())
            self._plain.encode_special_tokens = True
        return self._plain

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids` (ints, or anything iterable as ints such as a 1-D tensor), as transformers decodes it."""
        ids = [int(i) for i in ids]
        for pos, idx in enumerate(ids):
            if not 0 <= idx < self.vocab_size:
                raise ValueError(f"token id {idx} at position {pos} is outside the vocabulary [0, {self.vocab_size})")
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

    @functools.cached_property
    def byte_fallback_ids(self) -> frozenset[int]:
        """Ids of the "<0xNN>" byte pieces (SentencePiece byte fallback); empty for byte-level BPE."""
        vocab = self._backend.get_vocab(with_added_tokens=False)
        return frozenset(i for t, i in vocab.items() if len(t) == 6 and t.startswith("<0x") and t.endswith(">"))

    def id_to_token(self, idx: int) -> str | None:  # the vocabulary piece, e.g. "▁Hello" or "<0xE9>"
        return self._backend.id_to_token(idx)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    # -- chat ----------------------------------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """Render `messages` with the folder's chat template (ChatML for MiniCPM4); extra kwargs reach the template."""
        _check_messages(messages)
        specials = {k: _content(self.config.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
        return _compile(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **{**specials, **kwargs}
        )

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any) -> list[int]:
        """Prompt ids: the rendered template with special tokens parsed and BOS first (when add_bos).

        BOS comes from encode because the template emits none (tokenizing without special tokens is the
        parity trap of MINICPM4.md §2.5); a template that writes the BOS text itself gets no second one.
        """
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kwargs)
        starts_with_bos = self.bos_token is not None and text.startswith(self.bos_token)
        return self.encode(text, add_bos=self.add_bos and not starts_with_bos, allow_special=True)


class StreamDecoder:
    """Incremental detokenisation: push ids one at a time and get text as soon as it is final.

    Concatenating every push() and the final flush() equals tokenizer.decode(all ids), whatever the ids.
    The state is a window `ids[:read]` (the tokens behind the last emitted chunk) + `ids[read:]` (pending);
    each push decodes only the window, normally 1-3 tokens, so a token costs O(1), not O(sequence).
    Decoding the context token along with the new ones makes the leading-space strip of SentencePiece
    decoders hit the same token in both decodes, so their difference is exactly the new text.
    Text is held back (a) while it ends in U+FFFD, an unfinished character, and (b) while the last visible
    token is a byte-fallback piece "<0xNN>": HF's ByteFallback decodes a whole run of byte pieces at once
    and turns ALL of it into U+FFFD if any byte is invalid, so a run is final only when it ends.
    After _MAX_PENDING held tokens text is released anyway, so garbage bytes cannot make push() quadratic;
    only such garbage can then break the equality with decode(all) or emit a U+FFFD early.
    """

    _MAX_PENDING = 64  # >> 4, the longest UTF-8 character in byte tokens

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []
        self._read = 0
        self._context = ""  # decode(self._ids[: self._read]), cached: it only changes when the window moves
        self._in_byte_run = False
        self._invisible = set(tokenizer.special_token_ids.values()) if skip_special_tokens else set()

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completed ("" while a character is unfinished or nothing is visible)."""
        idx = int(token_id)
        self._ids.append(idx)
        if idx in self.tokenizer.byte_fallback_ids:
            self._in_byte_run = True
        elif idx not in self._invisible:  # a skipped special token does not end a byte run: decode drops it first
            self._in_byte_run = False
        may_hold = len(self._ids) - self._read < self._MAX_PENDING
        if self._in_byte_run and may_hold:
            return ""
        context, text = self._context, self._decode(self._ids)
        if len(text) <= len(context) or (text.endswith("\ufffd") and may_hold):
            return ""
        self._ids = self._ids[self._read :]  # the tokens behind this chunk become the next context
        self._read = len(self._ids)
        self._context = self._decode(self._ids)
        return text[len(context) :]

    def flush(self) -> str:
        """End the stream: return whatever is still held (possibly with U+FFFD) and reset for a new stream."""
        context, text = self._context, self._decode(self._ids)
        self._ids, self._read, self._context, self._in_byte_run = [], 0, "", False
        return text[len(context) :]
