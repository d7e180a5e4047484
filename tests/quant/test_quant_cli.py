"""`minicpm4 quantize` end to end on the bundled default model, and quantized folders in the other commands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from minicpm4.checkpoint import load_model
from minicpm4.cli import main
from minicpm4.quant import Int4Linear, TernaryLinear

pytestmark = pytest.mark.usefixtures("one_thread")
DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "minicpm4" / "assets" / "default-model"
VAL = DEFAULT_MODEL / "val_tokens.npy"


@pytest.fixture(scope="module")
def pgptq_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "pgptq"
    assert main(["quantize", str(DEFAULT_MODEL), "--method", "pgptq", "--group-size", "64", "-o", str(out),
                 "--calib", str(VAL), "--calib-samples", "8", "--calib-len", "64"]) == 0
    return out


def test_quantize_writes_a_gptq_folder_with_a_summary(pgptq_dir, capsys):
    q = json.loads((pgptq_dir / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == "gptq" and q["meta"]["method"] == "p-gptq" and q["meta"]["prefix_tokens"] == 4
    assert (pgptq_dir / "tokenizer.json").is_file()
    model = load_model(pgptq_dir)
    assert isinstance(model.model.layers[0].self_attn.q_proj, Int4Linear)


def test_quantize_summary_reports_size_errors_and_loss(tmp_path, capsys):
    out = tmp_path / "rtn"
    assert main(["quantize", str(DEFAULT_MODEL), "--method", "rtn", "--group-size", "64", "-o", str(out),
                 "--eval", str(VAL), "--eval-tokens", "2048"]) == 0
    text = capsys.readouterr().out
    assert "MiB ->" in text and "validation loss:" in text and "perplexity" in text
    ratio = float(text.split("MiB (")[1].split("x)")[0])
    assert 0.3 < ratio < 0.8  # linears to 4 bits; the tied 8192 x 192 embedding stays bf16


def test_ternary_method_packs(tmp_path):
    out = tmp_path / "t"
    assert main(["quantize", str(DEFAULT_MODEL), "--method", "ternary", "-o", str(out)]) == 0
    assert isinstance(load_model(out).model.layers[1].mlp.down_proj, TernaryLinear)


@pytest.mark.parametrize("argv, needle", [
    (["--method", "gptq"], "needs --calib"),
    (["--method", "rtn", "--group-size", "128"], "--group-size 128 must divide"),
    (["--method", "gptq", "--calib", "{val}", "--prefix-tokens", "2"], "--prefix-tokens applies to pgptq"),
    (["--method", "pgptq", "--calib", "/no/such/file"], "does not exist"),
])
def test_quantize_errors_are_one_line(argv, needle, tmp_path, capsys):
    argv = [a.replace("{val}", str(VAL)) for a in argv]
    assert main(["quantize", str(DEFAULT_MODEL), "-o", str(tmp_path / "o"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert needle in err[-1] and not any("Traceback" in line for line in err)


def test_quantizing_a_quantized_folder_is_refused(pgptq_dir, tmp_path, capsys):
    assert main(["quantize", str(pgptq_dir), "--method", "rtn", "--group-size", "64", "-o", str(tmp_path / "x")]) == 2
    assert "already quantized" in capsys.readouterr().err


def test_quantized_folder_in_info_generate_and_reference(pgptq_dir, capsys):
    assert main(["info", str(pgptq_dir)]) == 0
    assert "gptq 4-bit, group 64, method p-gptq" in capsys.readouterr().out
    texts = {}
    for engine in ("engine", "reference"):
        assert main(["generate", "--model", str(pgptq_dir), "--engine", engine, "-n", "12", "--temperature", "0",
                     "--dtype", "float32", "--chat", "What does lantern mean?"]) == 0
        texts[engine] = capsys.readouterr().out
    assert texts["engine"] == texts["reference"] and texts["engine"].strip()


def test_quantize_help():
    with pytest.raises(SystemExit) as e:
        main(["quantize", "--help"])
    assert e.value.code == 0


def test_calibration_sources(tmp_path):
    from minicpm4.quant.calibration import calibration_sequences
    from minicpm4.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(DEFAULT_MODEL)
    (tmp_path / "a.txt").write_text("A lantern is a portable light. " * 60)
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": f"word {i} means a thing. " * 20}) for i in range(5)))
    for f in ("a.txt", "b.jsonl"):
        seqs = calibration_sequences(tmp_path / f, tok, tok.bos_token_id, num_sequences=4, seq_len=32)
        assert len(seqs) == 4 and all(len(s) == 32 and int(s[0]) == tok.bos_token_id for s in seqs)
    seqs = calibration_sequences(VAL, None, 1, num_sequences=50, seq_len=100, exclude=(1000, 70000))
    import numpy as np
    stream = np.load(VAL)
    for s in seqs:  # every window lies before the excluded range
        body = s[1:].numpy()
        starts = [i for i in range(0, 1000) if (stream[i:i + 99] == body).all()]
        assert starts and starts[0] + 99 <= 1000
    (tmp_path / "bad.jsonl").write_text('{"nope": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        calibration_sequences(tmp_path / "bad.jsonl", tok, 1, 2, 8)
    assert torch.is_tensor(seqs[0])
