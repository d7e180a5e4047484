import json
from pathlib import Path

import pytest

from minicpm4.config import ConfigError, MiniCPMConfig, SparseConfig, minicpm4_05b, minicpm4_8b, preset, tiny
from minicpm4.model import MiniCPMForCausalLM

ASSETS = Path(__file__).resolve().parents[1] / "minicpm4" / "assets" / "minicpm4-0.5b"


def real_config_dict() -> dict:
    return json.loads((ASSETS / "config.json").read_text())


def test_real_05b_config_round_trips_to_identical_json(tmp_path):
    original = real_config_dict()
    cfg = MiniCPMConfig.from_json(ASSETS)
    cfg.save_json(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text()) == original
    # absent keys are absent, defaults applied: tied head, theta 10000
    assert cfg.tie_word_embeddings is True and cfg.rope_theta == 10000
    assert cfg.eos_token_ids == [2, 73440] and cfg.head_dim == 64 and cfg.num_key_value_groups == 8


def test_real_05b_config_builds_the_05b_parameter_count():
    import torch

    with torch.device("meta"):
        model = MiniCPMForCausalLM(MiniCPMConfig.from_json(ASSETS))
    # MINICPM4.md §2.2: 24 x 14.94M + 75.2M tied embedding = 0.434 B
    assert model.num_parameters() == 433_873_920


def test_8b_preset_parameter_count():
    import torch

    with torch.device("meta"):
        model = MiniCPMForCausalLM(minicpm4_8b())
    assert round(model.num_parameters() / 1e9, 2) == 8.19  # untied head (MINICPM4.md §2.2)


def test_unknown_keys_survive_and_changed_defaults_are_written(tmp_path):
    d = real_config_dict()
    d["my_custom_key"] = {"nested": [1, 2]}
    cfg = MiniCPMConfig.from_dict(d).replace(sparse_config=SparseConfig(), tie_word_embeddings=False)
    out = cfg.to_dict()
    assert out["my_custom_key"] == {"nested": [1, 2]}
    assert out["tie_word_embeddings"] is False  # absent in the source, but changed: written
    assert out["sparse_config"]["topk"] == 64 and out["sparse_config"]["dense_len"] == 8192
    again = MiniCPMConfig.from_dict(json.loads(json.dumps(out)))
    assert again.to_dict() == out


def test_eos_as_int_or_list_and_type_alias_for_rope():
    d = real_config_dict()
    d["eos_token_id"] = 2
    d["rope_scaling"]["type"] = d["rope_scaling"].pop("rope_type")
    cfg = MiniCPMConfig.from_dict(d)
    assert cfg.eos_token_ids == [2]
    assert cfg.to_dict() == d


@pytest.mark.parametrize("key, value, needle", [
    ("num_key_value_heads", 3, "num_key_value_heads"),
    ("hidden_size", "1024", "hidden_size"),
    ("eos_token_id", [2, "x"], "eos_token_id"),
    ("hidden_act", "gelu", "hidden_act"),
    ("scale_emb", -1, "scale_emb"),
    ("tie_word_embeddings", "yes", "tie_word_embeddings"),
    ("sparse_config", {"kernel_stride": 7}, "sparse_config.kernel_stride"),
    ("sparse_config", {"window_size": 100}, "sparse_config.window_size"),
])
def test_invalid_values_name_the_key(key, value, needle):
    d = real_config_dict()
    d[key] = value
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        MiniCPMConfig.from_dict(d)


def test_rope_factor_count_must_match_head_dim():
    d = real_config_dict()
    d["rope_scaling"]["long_factor"] = d["rope_scaling"]["long_factor"][:-1]
    with pytest.raises(ConfigError, match="rope_scaling.long_factor"):
        MiniCPMConfig.from_dict(d)


def test_broken_json_and_missing_file_are_clear(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        MiniCPMConfig.from_json(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        MiniCPMConfig.from_json(tmp_path / "nowhere")


def test_presets():
    assert preset("tiny").num_hidden_layers == 2
    assert preset("minicpm4-0.5b").to_dict()["rope_scaling"] == real_config_dict()["rope_scaling"]
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("gpt5")
    # presets write every key explicitly
    assert "tie_word_embeddings" in tiny().to_dict() and minicpm4_05b().tie_word_embeddings
