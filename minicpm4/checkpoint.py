"""Safetensors checkpoints in the Hugging Face layout: load into a meta-device model, save atomically.

A checkpoint folder holds `config.json` plus either `model.safetensors` or the shards
`model-0000k-of-0000n.safetensors` with `model.safetensors.index.json` (MINICPM4.md §2.3).
Loading validates every name and shape from the file headers first, then reads tensor by tensor
into a model built on the meta device and assigns them (DESIGN.md principle 4): the weights exist
once in memory and no random init runs. Only safetensors: pickled `.bin` files can run code on load.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from minicpm4.config import MiniCPMConfig
from minicpm4.io import fsync_files
from minicpm4.model import MiniCPMForCausalLM

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SHARD_PATTERN = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")

# Checkpoint (HF) name -> our parameter name; `{i}` is the layer index. model.py uses the HF names,
# so this is the identity today; it is the one place a rename would go (DESIGN.md principle 9).
NAME_MAP: dict[str, str] = {
    "model.embed_tokens.weight": "model.embed_tokens.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "model.layers.{i}.mlp.up_proj.weight": "model.layers.{i}.mlp.up_proj.weight",
    "model.layers.{i}.mlp.down_proj.weight": "model.layers.{i}.mlp.down_proj.weight",
    "model.layers.{i}.input_layernorm.weight": "model.layers.{i}.input_layernorm.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "model.norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",  # only when tie_word_embeddings is false
}
# Checkpoint tensors we drop: rotary inverse frequencies that old exporters saved as buffers;
# we recompute them from config.json (model.py LongRoPE).
IGNORED_NAMES = ("model.layers.{i}.self_attn.rotary_emb.inv_freq", "model.rotary_emb.inv_freq")
_IGNORED = [re.compile(re.escape(t).replace(re.escape("{i}"), r"\d+")) for t in IGNORED_NAMES]

# Read with pread(2) into memory we own, not mmap: mmap-backed parameters keep the file mapped and
# crash the process (SIGBUS) if the file is later rewritten in place. safetensors < 0.8 lacks the option.
_OPEN_OPTIONS = {"backend": "pread"} if "backend" in (safe_open.__text_signature__ or "") else {}

# safetensors header dtype -> torch dtype. Floats for every weight; the integer types only for the packed tensors
# of a quantized checkpoint (their names exist only in a quantized config's name map, so a stray integer
# tensor in a float checkpoint is still rejected, as unexpected).
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
           "I32": torch.int32, "U8": torch.uint8, "I8": torch.int8}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as is; the message names the file or tensor at fault."""


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype


def name_map(config: MiniCPMConfig) -> dict[str, str]:
    """Concrete checkpoint name -> our name for this config (`lm_head.weight` only when untied)."""
    out: dict[str, str] = {}
    for hf, ours in NAME_MAP.items():
        if hf == "lm_head.weight" and config.tie_word_embeddings:
            continue
        for i in range(config.num_hidden_layers) if "{i}" in hf else [0]:
            out[hf.format(i=i)] = ours.format(i=i)
    from minicpm4.quant.format import packed_names  # a quantization_config extends the map (packed tensors)

    return packed_names(config, out)


def inverse_name_map(config: MiniCPMConfig) -> dict[str, str]:
    """Our name -> checkpoint name, for saving."""
    forward = name_map(config)
    inverse = {ours: hf for hf, ours in forward.items()}
    assert len(inverse) == len(forward), "NAME_MAP must be one-to-one"
    return inverse


# ---- reading -------------------------------------------------------------------------------
def _names(names: list[str], limit: int = 10) -> str:
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


T = TypeVar("T")


def _with_file(path: Path, fn: Callable[[Any], T]) -> T:
    """Run fn(safe_open handle); a failure inside safetensors is re-raised naming the file."""
    try:
        with safe_open(path, framework="pt", device="cpu", **_OPEN_OPTIONS) as f:
            return fn(f)
    except SafetensorError as e:
        raise CheckpointError(f"cannot read {path}: {e} (truncated, or not a safetensors file?)") from e
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e


def _headers(path: Path, names: list[str] | None = None, index: Path | None = None) -> dict[str, TensorInfo]:
    """Names, shapes and dtypes of the tensors in one file (all, or the `names` an index lists)."""
    def read(f) -> dict[str, TensorInfo]:
        present = set(f.keys())
        if absent := [n for n in names or [] if n not in present]:
            raise CheckpointError(f"{index} places {len(absent)} tensor(s) in {path} that the shard does not hold: "
                                  f"{_names(absent)}")
        out = {}
        for name in sorted(present) if names is None else names:
            s = f.get_slice(name)
            if s.get_dtype() not in _DTYPES:
                raise CheckpointError(f"{path}: tensor {name} has dtype {s.get_dtype()}; weights must be floating point "
                                      "(or int32/uint8/int8 packed tensors of a quantized checkpoint)")
            out[name] = TensorInfo(path, tuple(s.get_shape()), _DTYPES[s.get_dtype()])
        return out

    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} does not exist" + (f" (listed in {index})" if index else ""))
    return _with_file(path, read)


def _checkpoint_folder(path: str | os.PathLike) -> Path:
    folder = Path(path)
    folder = folder.parent if folder.is_file() else folder  # a path to config.json or the weights
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
    return folder


def scan_checkpoint(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """Checkpoint name -> (file, shape, dtype), from the safetensors headers only (no tensor data)."""
    folder = _checkpoint_folder(path)
    single, index = folder / SINGLE_FILE, folder / INDEX_FILE
    if single.is_file():  # same precedence as transformers
        return _headers(single)
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise TypeError("weight_map must map tensor names to shard file names")
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index ({e!r})") from e
        out: dict[str, TensorInfo] = {}
        for shard in sorted(set(weight_map.values())):
            out.update(_headers(folder / shard, [n for n, s in weight_map.items() if s == shard], index))
        return out
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
    if pickles:
        raise CheckpointError(
            f"{folder} holds only PyTorch pickle weights ({_names(pickles, 3)}); convert them to safetensors first, "
            f"e.g. safetensors.torch.save_file(torch.load(f, weights_only=True), 'model.safetensors', {{'format': 'pt'}})")
    others = sorted(p.name for p in folder.glob("*.safetensors"))
    if len(others) == 1 and (folder / "quantize_config.json").is_file():  # AutoGPTQ names its one file freely
        return _headers(folder / others[0])
    hint = f" (found {_names(others, 3)}: shards need {INDEX_FILE})" if others else ""
    raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {folder}{hint}")


def _dominant_dtype(tensors: list[tuple[torch.dtype, int]]) -> torch.dtype:
    """The float dtype holding most elements: a bf16 checkpoint with a few fp32 norms counts as bf16 (packed integer
    tensors of a quantized checkpoint do not count: the model computes in its scales' and norms' dtype)."""
    counts: Counter[torch.dtype] = Counter()
    for dtype, numel in tensors:
        if dtype.is_floating_point:
            counts[dtype] += numel
    return counts.most_common(1)[0][0] if counts else torch.float32


def checkpoint_dtype(path: str | os.PathLike) -> torch.dtype:
    """The dtype `load_model(path)` loads in: the checkpoint's stored (dominant) dtype."""
    return _dominant_dtype([(i.dtype, torch.Size(i.shape).numel()) for i in scan_checkpoint(path).values()])


def _same_tensor(a: TensorInfo, a_name: str, b: TensorInfo, b_name: str, rows: int = 1024) -> bool:
    """Exact equality read in row chunks, so comparing two embeddings needs no full copy of either."""
    if a.shape != b.shape:
        return False
    for start in range(0, a.shape[0], rows):
        chunk_a = _with_file(a.file, lambda f: f.get_slice(a_name)[start:start + rows])
        chunk_b = _with_file(b.file, lambda f: f.get_slice(b_name)[start:start + rows])
        if not torch.equal(chunk_a.double(), chunk_b.double()):
            return False
    return True


def load_model(path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
               strict: bool = True) -> MiniCPMForCausalLM:
    """Load a checkpoint folder; dtype None keeps the stored dtype. strict=False initialises missing
    tensors as `init_weights` does (with a warning) and ignores unexpected ones."""
    from minicpm4.quant.format import with_quantize_config

    folder = _checkpoint_folder(path)
    config = with_quantize_config(MiniCPMConfig.from_json(folder), folder)
    infos = scan_checkpoint(folder)
    target = dtype or _dominant_dtype([(i.dtype, torch.Size(i.shape).numel()) for i in infos.values()])
    with torch.device("meta"):
        model = MiniCPMForCausalLM(config)
    from minicpm4.quant.format import is_packed_tensor, prepare_packed_modules

    prepare_packed_modules(model, target)  # a quantized checkpoint: empty packed linears where it says
    expected = {name: tuple(p.shape) for name, p in model.state_dict().items()}

    to_ours, plan, unexpected = name_map(config), {}, []  # plan: our name -> checkpoint name
    for ck in infos:
        if ck in to_ours:
            plan[to_ours[ck]] = ck
        elif not (ck == "lm_head.weight" and config.tie_word_embeddings) and not any(p.fullmatch(ck) for p in _IGNORED):
            unexpected.append(ck)
    missing = [name for name in expected if name not in plan]
    problems = [f"{ck}: expected shape {list(expected[ours])} from config.json, found {list(infos[ck].shape)} "
                f"in {infos[ck].file.name}" for ours, ck in plan.items() if infos[ck].shape != expected[ours]]
    if strict and unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s): {_names(sorted(unexpected))}")
    if strict and missing:
        hint = ("; config.json says tie_word_embeddings: false, so lm_head.weight is required"
                if "lm_head.weight" in missing else "")
        problems.append(f"{len(missing)} missing tensor(s): {_names(missing)}{hint}")
    embed = infos.get("model.embed_tokens.weight")
    if config.tie_word_embeddings and "lm_head.weight" in infos and embed is not None and not problems:
        # Some exporters write a tied head anyway; harmless only if it is the embedding exactly.
        if not _same_tensor(infos["lm_head.weight"], "lm_head.weight", embed, "model.embed_tokens.weight"):
            problems.append("lm_head.weight differs from model.embed_tokens.weight but config.json ties them; "
                            "set \"tie_word_embeddings\": false in config.json to load a separate head")
    if problems:
        raise CheckpointError(f"checkpoint {folder} does not match its config.json:\n  " + "\n  ".join(problems))
    if unexpected:
        warnings.warn(f"{folder}: ignored {len(unexpected)} unexpected tensor(s): {_names(sorted(unexpected))}")

    by_file: dict[Path, list[tuple[str, str]]] = defaultdict(list)
    for ours, ck in plan.items():
        by_file[infos[ck].file].append((ours, ck))
    state: dict[str, torch.Tensor] = {}
    for file, pairs in by_file.items():
        def read(f, pairs=pairs) -> None:
            for ours, ck in pairs:  # one tensor at a time; the cast frees the stored-dtype copy at once
                t = f.get_tensor(ck)  # packed tensors (codes, GPTQ scales) keep their stored dtype
                cast = t.is_floating_point() and not is_packed_tensor(ck, config)
                state[ours] = t.to(device=device, dtype=target if cast else t.dtype)
        _with_file(file, read)
    model.load_state_dict(state, strict=strict, assign=True)
    del state
    if missing:
        _init_missing(model, missing, target, device)
        warnings.warn(f"{folder}: initialised {len(missing)} tensor(s) missing from the checkpoint: {_names(missing)}")
    still_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    assert not still_meta, f"left on the meta device after loading: {_names(still_meta)}"
    return model


def _init_missing(model: MiniCPMForCausalLM, missing: list[str], dtype: torch.dtype,
                  device: str | torch.device) -> None:
    owners = []
    for name in missing:
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        old = getattr(module, leaf)
        setattr(module, leaf, nn.Parameter(torch.empty(old.shape, dtype=dtype, device=device), old.requires_grad))
        owners.append(module)
    # Run init_weights itself (not a copy of its rules) on only the modules owning missing tensors:
    # it walks `self.modules()` and reads `self.config`, so a holder with those two is enough.
    holder = nn.Module()
    holder.config = model.config
    holder.owners = nn.ModuleList(owners)
    MiniCPMForCausalLM.init_weights(holder)


# ---- writing -------------------------------------------------------------------------------
# What a Hugging Face folder holds beside config.json and the weights: copied along by every command that writes
# a model folder from another one (training exports, quantize).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "generation_config.json")


def copy_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy the tokenizer and generation files of folder src that exist into dst; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied


def estimate_memory(config: MiniCPMConfig, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of the weights alone (no KV cache, no activations), from the config's shapes."""
    h, q, kv = config.hidden_size, config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    per_layer = 2 * h * q + 2 * h * kv + 3 * h * config.intermediate_size + 2 * h
    embeddings = config.vocab_size * h * (1 if config.tie_word_embeddings else 2)
    return (embeddings + config.num_hidden_layers * per_layer + h) * dtype.itemsize


def save_model(model: MiniCPMForCausalLM, path: str | os.PathLike, max_shard_size: int = 2 * 1024**3,
               dtype: torch.dtype | None = None) -> Path:
    """Write config.json + model.safetensors (or shards + index once the weights exceed max_shard_size).

    Everything is written to a hidden sibling folder first and moved in afterwards, so an interrupted
    save leaves either the old checkpoint or no loadable weights, never a mix. Peak extra memory is
    about one shard (safetensors serialises a file's tensors to bytes before writing).
    """
    if max_shard_size <= 0:
        raise ValueError(f"max_shard_size must be positive, got {max_shard_size}")
    folder = Path(path).resolve()  # the temp folder must be a true sibling (same filesystem) for rename
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"cannot save a checkpoint to {folder}: it is a file")
    to_hf = inverse_name_map(model.config)
    tensors: dict[str, torch.Tensor] = {}
    storages: set[tuple[torch.device, int]] = set()
    for ours, t in model.state_dict().items():
        if ours not in to_hf:
            raise CheckpointError(f"model tensor {ours} has no checkpoint name in NAME_MAP")
        if t.is_meta:
            raise CheckpointError(f"model tensor {ours} is still on the meta device; load or init the model first")
        key = (t.device, t.untyped_storage().data_ptr())
        # A tied config has no lm_head at all; shared storage here means the config says untied, so the
        # loader needs both names, and safetensors refuses shared storage: write an independent copy.
        tensors[to_hf[ours]] = t.detach().clone() if key in storages else t.detach()
        storages.add(key)
    saved_dtype = dtype or _dominant_dtype([(t.dtype, t.numel()) for t in tensors.values()])
    from minicpm4.quant.format import is_packed_tensor

    def cast_to(name: str, t: torch.Tensor) -> torch.dtype:  # `dtype` applies to float weights, not packed tensors
        return dtype if dtype and t.is_floating_point() and not is_packed_tensor(name, model.config) else t.dtype

    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():  # greedy in model order, as transformers does
        nbytes = t.numel() * cast_to(name, t).itemsize
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    n = len(shards)
    files = [SINGLE_FILE] if n == 1 else [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.saving-"))
    try:
        total, weight_map = 0, {}
        for file, names in zip(files, shards):
            shard = {name: tensors[name].to(device="cpu", dtype=cast_to(name, tensors[name])).contiguous() for name in names}
            save_file(shard, tmp / file, metadata={"format": "pt"})  # transformers expects format=pt
            total += sum(t.numel() * t.element_size() for t in shard.values())
            weight_map.update({name: file for name in names})
            del shard
        entry = SINGLE_FILE
        if n > 1:
            entry = INDEX_FILE
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        dtype_name = str(saved_dtype).removeprefix("torch.")
        config = model.config if model.config.torch_dtype == dtype_name else model.config.replace(torch_dtype=dtype_name)
        config.save_json(tmp / "config.json")
        fsync_files(tmp)  # data on disk before the renames that publish it
        _install(tmp, folder, entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _install(tmp: Path, folder: Path, entry: str) -> None:
    """Move a finished checkpoint from tmp into folder; the entry file (single file or index) goes last."""
    if not folder.exists():
        os.replace(tmp, folder)  # one atomic rename
        return
    # An existing folder may hold a tokenizer and more: keep those. Drop the old entry points first,
    # so until the new entry lands the folder has no loadable weights rather than old/new mixed;
    # then drop stale shards (a previous save may have had more of them).
    for name in (INDEX_FILE, SINGLE_FILE):
        (folder / name).unlink(missing_ok=True)
    for old in folder.iterdir():
        if SHARD_PATTERN.fullmatch(old.name):
            old.unlink()
    for f in sorted(tmp.iterdir(), key=lambda p: p.name == entry):
        os.replace(f, folder / f.name)
