"""Checkpoint load/save: bit-exact round trips, sharding, dtype choice, clear errors, HF layout."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from minicpm4 import checkpoint as ckpt
from minicpm4.checkpoint import (INDEX_FILE, NAME_MAP, SINGLE_FILE, CheckpointError, checkpoint_dtype,
                                 estimate_memory, inverse_name_map, load_model, name_map, save_model)
from minicpm4.config import minicpm4_05b, tiny
from minicpm4.model import MiniCPMForCausalLM, build_model

IDS = torch.tensor([[1, 5, 77, 300, 2, 999, 42, 8]])


def make_model(tied: bool = True, dtype: torch.dtype = torch.float32, seed: int = 0) -> MiniCPMForCausalLM:
    model = build_model(tiny(tie_word_embeddings=tied), dtype=dtype, seed=seed)
    with torch.no_grad():  # norms init to 1: randomise them so a round trip that dropped them would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    return model


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype, name
        assert torch.equal(sa[name], sb[name]), name


def second_shard(folder: Path) -> str:
    return sorted(set(json.loads((folder / INDEX_FILE).read_text())["weight_map"].values()))[1]


def file_keys(path: Path) -> set[str]:
    with safe_open(path, framework="pt") as f:
        return set(f.keys())


def edit_tensors(path: Path, edit) -> None:
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.fixture
def saved(tmp_path: Path) -> tuple[MiniCPMForCausalLM, Path]:
    model = make_model(tied=False)
    return model, save_model(model, tmp_path / "ckpt")


# ---- name map --------------------------------------------------------------------------------
@pytest.mark.parametrize("tied", [True, False])
def test_name_map_is_one_to_one_and_covers_the_model(tied: bool) -> None:
    config = tiny(tie_word_embeddings=tied)
    forward = name_map(config)
    assert len(set(NAME_MAP.values())) == len(NAME_MAP)
    assert len(set(forward.values())) == len(forward)
    with torch.device("meta"):
        expected = set(MiniCPMForCausalLM(config).state_dict())
    assert set(forward.values()) == expected
    assert ("lm_head.weight" in forward) is (not tied)
    assert {hf: ours for ours, hf in inverse_name_map(config).items()} == forward


# ---- round trips -----------------------------------------------------------------------------
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_bit_exact(tmp_path: Path, tied: bool, dtype: torch.dtype) -> None:
    model = make_model(tied, dtype)
    folder = save_model(model, tmp_path / "ckpt")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", SINGLE_FILE]
    with safe_open(folder / SINGLE_FILE, framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert ("lm_head.weight" in f.keys()) is (not tied)
    assert json.loads((folder / "config.json").read_text())["torch_dtype"] == str(dtype).removeprefix("torch.")
    assert checkpoint_dtype(folder) == dtype

    loaded = load_model(folder)
    assert_same_weights(model, loaded)
    assert loaded.config.tie_word_embeddings is tied and (loaded.lm_head is None) is tied
    with torch.no_grad():
        assert torch.equal(model(IDS), loaded(IDS))


def test_tied_checkpoint_stores_the_embedding_once(tmp_path: Path) -> None:
    model = make_model(tied=True)
    folder = save_model(model, tmp_path / "ckpt")
    weight_bytes = estimate_memory(model.config, torch.float32)
    assert weight_bytes == model.num_parameters() * 4
    # safetensors adds only a small JSON header to the raw tensor bytes
    assert weight_bytes < (folder / SINGLE_FILE).stat().st_size < weight_bytes + 8192


def test_untied_model_with_shared_storage_still_saves_both_names(tmp_path: Path) -> None:
    model = make_model(tied=False)
    model.lm_head.weight = model.model.embed_tokens.weight  # shared storage under an untied config
    loaded = load_model(save_model(model, tmp_path / "ckpt"))
    assert torch.equal(loaded.lm_head.weight, model.model.embed_tokens.weight)
    assert loaded.lm_head.weight.data_ptr() != loaded.model.embed_tokens.weight.data_ptr()


def test_sharded_round_trip_and_stale_shards(tmp_path: Path) -> None:
    model = make_model(tied=False)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes(b"keep me")
    save_model(model, folder, max_shard_size=300_000)
    index = json.loads((folder / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    n = len(shards)
    assert n >= 3 and shards == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    assert not (folder / SINGLE_FILE).exists()
    assert set(index["weight_map"]) == set(model.state_dict())
    assert index["metadata"]["total_size"] == model.num_parameters() * 4
    for shard in shards:
        assert file_keys(folder / shard) == {k for k, v in index["weight_map"].items() if v == shard}
        keys = file_keys(folder / shard)
        assert len(keys) == 1 or sum(model.state_dict()[k].nbytes for k in keys) <= 300_000
    assert_same_weights(model, load_model(folder))

    # fewer shards: the old shards disappear, the tokenizer stays
    save_model(model, folder, max_shard_size=600_000)
    new_shards = sorted(p.name for p in folder.glob("model-*.safetensors"))
    assert len(new_shards) < n and set(new_shards) == set(json.loads((folder / INDEX_FILE).read_text())["weight_map"].values())
    assert (folder / "tokenizer.model").read_bytes() == b"keep me"
    assert_same_weights(model, load_model(folder))

    # one file: the index and every shard go
    save_model(model, folder)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", SINGLE_FILE, "tokenizer.model"]
    assert_same_weights(model, load_model(folder))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


@pytest.mark.parametrize("stored,wanted", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])
def test_dtype_is_chosen_on_load(tmp_path: Path, stored: torch.dtype, wanted: torch.dtype) -> None:
    model = make_model(tied=False, dtype=stored)
    folder = save_model(model, tmp_path / "ckpt")
    loaded = load_model(folder, dtype=wanted)
    for name, t in model.state_dict().items():
        got = loaded.state_dict()[name]
        assert got.dtype == wanted and torch.equal(got, t.to(wanted)), name


def test_save_casts_to_dtype(tmp_path: Path) -> None:
    model = make_model(tied=True)
    folder = save_model(model, tmp_path / "ckpt", dtype=torch.bfloat16, max_shard_size=100_000)
    assert checkpoint_dtype(folder) == torch.bfloat16
    assert json.loads((folder / INDEX_FILE).read_text())["metadata"]["total_size"] == model.num_parameters() * 2
    loaded = load_model(folder)
    for name, t in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t.bfloat16()), name
    assert model.model.embed_tokens.weight.dtype == torch.float32  # the model itself is untouched


# ---- broken files ----------------------------------------------------------------------------
def test_truncated_file_names_the_file(saved) -> None:
    _, folder = saved
    data = (folder / SINGLE_FILE).read_bytes()
    (folder / SINGLE_FILE).write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match=f"{SINGLE_FILE}.*truncated") as e:
        load_model(folder)
    assert e.value.__cause__ is not None  # the safetensors error is kept as the cause


def test_garbage_file_names_the_file(saved) -> None:
    _, folder = saved
    (folder / SINGLE_FILE).write_bytes(bytes(range(256)) * 16)  # header length 0x0706050403020100
    with pytest.raises(CheckpointError, match=SINGLE_FILE):
        load_model(folder)


def test_truncated_shard_names_the_shard(tmp_path: Path) -> None:
    folder = save_model(make_model(tied=False), tmp_path / "ckpt", max_shard_size=300_000)
    shard = folder / second_shard(folder)
    shard.write_bytes(shard.read_bytes()[:-8])
    with pytest.raises(CheckpointError, match=shard.name):
        load_model(folder)


def test_missing_shard(tmp_path: Path) -> None:
    folder = save_model(make_model(tied=False), tmp_path / "ckpt", max_shard_size=300_000)
    shard = second_shard(folder)
    (folder / shard).unlink()
    with pytest.raises(FileNotFoundError, match=f"{shard} does not exist.*{INDEX_FILE}"):
        load_model(folder)


def test_index_pointing_to_a_tensor_the_shard_lacks(tmp_path: Path) -> None:
    folder = save_model(make_model(tied=False), tmp_path / "ckpt", max_shard_size=300_000)
    index = json.loads((folder / INDEX_FILE).read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"]["model.norm.weight"] = first
    (folder / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model.norm.weight") as e:
        load_model(folder)
    assert first in str(e.value) and INDEX_FILE in str(e.value)


def test_corrupt_index(tmp_path: Path) -> None:
    folder = save_model(make_model(tied=False), tmp_path / "ckpt", max_shard_size=300_000)
    (folder / INDEX_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match=INDEX_FILE):
        load_model(folder)


def test_missing_config_json(saved) -> None:
    _, folder = saved
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(folder)


def test_missing_folder_and_missing_weights(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_model(tmp_path / "nowhere")
    tiny().save_json(tmp_path)
    with pytest.raises(FileNotFoundError, match=SINGLE_FILE):
        load_model(tmp_path)
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=f"model-00001-of-00002.safetensors.*{INDEX_FILE}"):
        load_model(tmp_path)


def test_bin_only_folder_asks_for_conversion(tmp_path: Path) -> None:
    tiny().save_json(tmp_path)
    torch.save(make_model().state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin.*convert"):
        load_model(tmp_path)


# ---- name and shape mismatches ---------------------------------------------------------------
def test_missing_and_unexpected_tensors_are_named(saved) -> None:
    _, folder = saved

    def edit(t: dict) -> None:
        del t["model.norm.weight"], t["model.layers.1.mlp.up_proj.weight"]
        t["model.layers.0.mlp.extra.weight"] = torch.zeros(2)
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # old exporters: ignored

    edit_tensors(folder / SINGLE_FILE, edit)
    with pytest.raises(CheckpointError) as e:
        load_model(folder)
    msg = str(e.value)
    assert "2 missing tensor(s): model.layers.1.mlp.up_proj.weight, model.norm.weight" in msg
    assert "1 unexpected tensor(s): model.layers.0.mlp.extra.weight" in msg
    assert "inv_freq" not in msg


def test_many_missing_tensors_are_listed_with_a_count(saved) -> None:
    _, folder = saved
    edit_tensors(folder / SINGLE_FILE, lambda t: [t.pop(k) for k in list(t) if k.startswith("model.layers.")])
    with pytest.raises(CheckpointError, match=r"18 missing tensor\(s\): model.layers.0.self_attn.q_proj.weight, .*\(8 more\)"):
        load_model(folder)


def test_non_strict_initialises_missing_tensors(saved) -> None:
    model, folder = saved
    edit_tensors(folder / SINGLE_FILE, lambda t: (t.pop("model.norm.weight"), t.pop("model.layers.0.mlp.up_proj.weight"),
                                                  t.update({"stray.weight": torch.zeros(1)})))
    with pytest.warns(UserWarning) as record:
        loaded = load_model(folder, strict=False)
    messages = " | ".join(str(w.message) for w in record)
    assert "missing from the checkpoint: model.layers.0.mlp.up_proj.weight, model.norm.weight" in messages
    assert "ignored 1 unexpected tensor(s): stray.weight" in messages
    assert torch.equal(loaded.model.norm.weight, torch.ones(64))
    up = loaded.model.layers[0].mlp.up_proj.weight
    assert up.shape == (160, 64) and not up.is_meta and 0.05 < float(up.detach().std()) < 0.15  # normal(0, 0.1)
    assert torch.equal(loaded.model.layers[1].mlp.up_proj.weight, model.model.layers[1].mlp.up_proj.weight)
    with torch.no_grad():
        assert torch.isfinite(loaded(IDS)).all()


def test_untied_config_without_lm_head_hints_at_tying(tmp_path: Path) -> None:
    folder = save_model(make_model(tied=True), tmp_path / "ckpt")
    tiny(tie_word_embeddings=False).save_json(folder)
    with pytest.raises(CheckpointError, match="missing tensor.*lm_head.weight.*tie_word_embeddings"):
        load_model(folder)


def test_shape_mismatch_names_tensor_and_shapes(saved) -> None:
    _, folder = saved
    tiny(tie_word_embeddings=False, intermediate_size=128).save_json(folder)
    with pytest.raises(CheckpointError, match=r"model.layers.0.mlp.gate_proj.weight: expected shape \[128, 64\] "
                                              r"from config.json, found \[160, 64\]"):
        load_model(folder)


def test_tied_config_accepts_an_lm_head_equal_to_the_embedding(tmp_path: Path) -> None:
    model = make_model(tied=True)
    folder = save_model(model, tmp_path / "ckpt")
    edit_tensors(folder / SINGLE_FILE, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()}))
    assert_same_weights(model, load_model(folder))

    edit_tensors(folder / SINGLE_FILE, lambda t: t["lm_head.weight"][5, 3].add_(1.0))
    with pytest.raises(CheckpointError, match=r"lm_head.weight differs.*\"tie_word_embeddings\": false"):
        load_model(folder)


# ---- meta-device loading ---------------------------------------------------------------------
def test_strict_load_never_runs_a_random_init(saved, monkeypatch) -> None:
    model, folder = saved

    def forbidden(self, *args, **kwargs):
        raise AssertionError("init_weights ran during a strict load")

    monkeypatch.setattr(MiniCPMForCausalLM, "init_weights", forbidden)
    loaded = load_model(folder)
    assert all(not p.is_meta and p.requires_grad for p in loaded.parameters())
    assert_same_weights(model, loaded)


@pytest.mark.skipif(not Path("/proc/self/maps").exists() or not ckpt._OPEN_OPTIONS,
                    reason="needs Linux /proc and safetensors with the pread backend")
def test_loaded_weights_do_not_map_the_file(saved) -> None:
    # mmap-backed parameters would crash the process (SIGBUS) once the file is rewritten in place
    _, folder = saved
    loaded = load_model(folder)
    assert str(folder / SINGLE_FILE) not in Path("/proc/self/maps").read_text()
    edit_tensors(folder / SINGLE_FILE, lambda t: t.pop("model.norm.weight"))
    assert torch.isfinite(sum(p.sum() for p in loaded.parameters()))


# ---- atomic saves ----------------------------------------------------------------------------
def test_failed_save_leaves_the_old_checkpoint(saved, monkeypatch) -> None:
    model, folder = saved
    calls = []

    def failing_save_file(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError("disk full")
        return save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(ckpt, "save_file", failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        save_model(make_model(tied=False, seed=1), folder, max_shard_size=300_000)
    assert_same_weights(model, load_model(folder))
    assert sorted(p.name for p in folder.parent.iterdir()) == ["ckpt"]


def test_save_interrupted_while_installing_leaves_nothing_loadable(saved, monkeypatch) -> None:
    _, folder = saved
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst) == folder / INDEX_FILE:
            raise KeyboardInterrupt  # the process dies just before the new entry point lands
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        save_model(make_model(tied=False, seed=1), folder, max_shard_size=300_000)
    monkeypatch.setattr(os, "replace", real_replace)
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):  # not an old/new mix
        load_model(folder)


# ---- memory estimate -------------------------------------------------------------------------
def test_estimate_memory() -> None:
    for tied in (True, False):
        config = tiny(tie_word_embeddings=tied)
        with torch.device("meta"):
            n = MiniCPMForCausalLM(config).num_parameters()
        assert estimate_memory(config, torch.bfloat16) == 2 * n
    assert estimate_memory(minicpm4_05b(), torch.float32) / 4 == pytest.approx(0.434e9, rel=0.01)  # MINICPM4.md §2.2


# ---- Hugging Face layout ---------------------------------------------------------------------
def llama_like(tied: bool):
    transformers = pytest.importorskip("transformers")
    c = tiny(tie_word_embeddings=tied)
    llama_cfg = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, tie_word_embeddings=tied)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(llama_cfg), c


@pytest.mark.parametrize("tied,shard", [(True, None), (False, None), (False, "200KB")])
def test_loads_a_checkpoint_written_by_transformers(tmp_path: Path, tied: bool, shard: str | None) -> None:
    llama, config = llama_like(tied)
    llama.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    assert (tmp_path / (INDEX_FILE if shard else SINGLE_FILE)).exists()
    config.save_json(tmp_path)  # our config.json over theirs: same shapes, MiniCPM fields
    loaded = load_model(tmp_path)
    theirs = llama.state_dict()
    for name, t in loaded.state_dict().items():
        assert torch.equal(t, theirs[name]), name


@pytest.mark.parametrize("tied", [True, False])
def test_transformers_loads_our_checkpoint(tmp_path: Path, tied: bool) -> None:
    llama, config = llama_like(tied)
    model = make_model(tied)
    save_model(model, tmp_path, max_shard_size=300_000)
    llama.config.save_pretrained(tmp_path)  # a Llama config.json over ours, so transformers reads it natively
    reloaded = type(llama).from_pretrained(tmp_path)
    theirs = reloaded.state_dict()
    for name, t in model.state_dict().items():
        assert torch.equal(t, theirs[name]), name
    if not tied:
        assert torch.equal(theirs["lm_head.weight"], model.lm_head.weight)
