"""The bundled default model loads, matches the numbers on its model card, and chats."""

import io
import json

import numpy as np
import pytest

from minicpm4.api import DEFAULT_MODEL_DIR, default_pipeline, has_default_model
from minicpm4.cli import main
from minicpm4.train.default_model import VAL_TOKENS_FILE, validation_loss

pytestmark = pytest.mark.skipif(not has_default_model(), reason="no trained default model ships yet (make default-model)")


@pytest.fixture(scope="module")
def pipe():
    return default_pipeline()


def test_validation_loss_matches_the_model_card_within_1_percent(pipe):
    card = json.loads((DEFAULT_MODEL_DIR / "eval.json").read_text())
    tokens = np.load(DEFAULT_MODEL_DIR / VAL_TOKENS_FILE)
    loss = validation_loss(pipe.model, tokens)
    assert abs(loss - card["val_loss"]) / card["val_loss"] < 0.01, (loss, card["val_loss"])
    assert f"{card['val_loss']:.4f}" in (DEFAULT_MODEL_DIR / "README.md").read_text()
    assert pipe.model.num_parameters() == card["parameters"]


def test_sft_beats_pretrained_only_on_heldout_definitions():
    h = json.loads((DEFAULT_MODEL_DIR / "eval.json").read_text())["heldout_definitions"]
    assert h["final"]["answer_nll"] < h["pretrained_only"]["answer_nll"]


def test_chat_on_the_default_model(pipe, monkeypatch, capsys):
    reply = pipe.chat([{"role": "user", "content": "What does the word \"lantern\" mean?"}], max_new_tokens=12, temperature=0)
    assert isinstance(reply, str) and reply.strip()
    monkeypatch.setattr("sys.stdin", io.StringIO("What does dog mean?\n/exit\n"))
    assert main(["chat", "-n", "8", "--temperature", "0"]) == 0
    assert "assistant>" in capsys.readouterr().out
