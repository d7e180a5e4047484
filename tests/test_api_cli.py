"""Public API and CLI: text in, text out; every subcommand's --help; error paths give one line."""

import io
import shutil
from pathlib import Path

import pytest
import torch

import minicpm4
from minicpm4.api import BUNDLED_TOKENIZER_DIR, demo_pipeline
from minicpm4.cli import build_parser, main
from minicpm4.config import tiny

SUBCOMMANDS = ["generate", "chat", "info", "convert", "demo", "frspec-index"]


@pytest.fixture(scope="module")
def pipe():
    return demo_pipeline(seed=3)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, hub_folder):
    """A tiny MiniCPM4 folder laid out as on the Hub: config, safetensors, tokenizer files."""
    return hub_folder(tmp_path_factory.mktemp("tiny-model"), tiny(vocab_size=73448, eos_token_id=[2, 73440],
                                                                  initializer_range=0.3))


def test_stream_concatenates_to_generate(pipe):
    full = pipe.generate("The quick brown fox", max_new_tokens=20, ignore_eos=True, seed=0)
    streamed = "".join(pipe.stream("The quick brown fox", max_new_tokens=20, ignore_eos=True, seed=0))
    assert streamed == full.text and len(full.token_ids) == 20
    assert full.text == pipe.tokenizer.decode(full.token_ids, skip_special_tokens=True)


def test_stop_string_cuts_text_and_ends_generation(pipe):
    full = pipe.generate("Once upon a time", max_new_tokens=24, ignore_eos=True, seed=0).text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop.strip(), "the random model produced no visible text to stop on"
    cut = pipe.generate("Once upon a time", max_new_tokens=24, ignore_eos=True, seed=0, stop=[stop])
    assert cut.text == full[: full.index(stop)] and cut.finish_reason == "stop"


def test_chat_and_batch(pipe):
    msgs = [{"role": "user", "content": "Hi"}]
    assert pipe.encode_prompt(msgs)[0] == 1  # BOS, then the ChatML turn
    batch = pipe.generate(["a", "a longer prompt here"], max_new_tokens=5, ignore_eos=True)
    assert [len(c.token_ids) for c in batch] == [5, 5]
    with pytest.raises(ValueError, match="unknown sampling parameter"):
        pipe.generate("a", temprature=0.5)


def test_from_pretrained_loads_folder_and_generation_defaults(model_dir):
    shutil.copy(BUNDLED_TOKENIZER_DIR / "generation_config.json", model_dir / "generation_config.json")
    pipe = minicpm4.from_pretrained(model_dir, dtype="float32")
    assert pipe.defaults == {"temperature": 0.8, "top_p": 0.8}  # MINICPM4.md §2.6
    assert pipe.model.model.embed_tokens.weight.dtype == torch.float32
    assert isinstance(pipe.chat([{"role": "user", "content": "Hi"}], max_new_tokens=3, seed=0), str)


@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_help_of_every_subcommand(sub, capsys):
    with pytest.raises(SystemExit) as e:
        main([sub, "--help"])
    assert e.value.code == 0 and "usage: minicpm4 " + sub in capsys.readouterr().out


def test_parser_lists_every_subcommand():
    help_text = build_parser().format_help()
    assert all(s in help_text for s in SUBCOMMANDS)


def test_info_on_preset_and_folder(capsys, model_dir):
    assert main(["info", "minicpm4-0.5b"]) == 0
    out = capsys.readouterr().out
    assert "433,873,920" in out and "G = 8" in out and "bfloat16" in out
    assert main(["info", str(model_dir)]) == 0


@pytest.mark.parametrize("argv, needle", [
    (["info", "/no/such/dir"], "no such folder"),
    (["generate", "--model", "/no/such/dir", "hi"], "not a folder"),
    (["generate", "--model", "{tmp}", "hi"], "config.json"),
    (["convert", "{tmp}", "--to", "gguf"], "no config.json"),
    (["generate", "-n", "-3", "hi"], "max_new_tokens"),
    (["generate", "--top-p", "2", "hi"], "top_p"),
])
def test_error_paths_print_one_line(argv, needle, capsys, tmp_path):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("minicpm4 ") and needle in err[-1]
    assert not any("Traceback" in line for line in err)


def test_corrupt_model_folder_is_one_line(capsys, model_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert main(["generate", "--model", str(broken), "hi"]) == 2
    assert "model.safetensors" in capsys.readouterr().err.strip().splitlines()[-1]


def test_bad_argument_is_argparse_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--temperature", "hot"])
    assert e.value.code == 2 and "invalid float value" in capsys.readouterr().err


def test_generate_prints_text_and_tokens_per_second(capsys, model_dir):
    assert main(["generate", "--model", str(model_dir), "--dtype", "float32", "-n", "8", "--temperature", "0", "Hello"]) == 0
    captured = capsys.readouterr()
    assert "tokens/s" in captured.err and "8 generated" in captured.err


def test_chat_keeps_history_and_resets(monkeypatch, capsys, model_dir):
    import minicpm4.api as api

    seen = []
    original = api.Pipeline.stream

    def spy(self, prompt, params=None, **kw):
        seen.append([dict(m) for m in prompt])
        return original(self, prompt, params, **kw)

    monkeypatch.setattr(api.Pipeline, "stream", spy)
    stdin = io.StringIO("first\nsecond\n/reset\nthird\n/exit\nnever\n")
    monkeypatch.setattr("sys.stdin", stdin)
    assert main(["chat", "--model", str(model_dir), "--system", "be brief", "-n", "4", "--temperature", "0"]) == 0
    assert [len(m) for m in seen] == [2, 4, 2]  # system+user, then +assistant+user, then reset
    assert seen[1][2]["role"] == "assistant" and seen[2][1]["content"] == "third"
