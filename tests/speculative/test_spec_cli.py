"""`--draft` on the command line: the same greedy text as without it, and flag errors as one-line messages."""

from __future__ import annotations

import pytest

from minicpm4.checkpoint import load_model
from minicpm4.cli import main
from minicpm4.config import tiny
from minicpm4.speculative.draft_model import build_draft, save_draft

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folders(tmp_path_factory, hub_folder):
    base = tmp_path_factory.mktemp("spec-cli")
    model_dir = hub_folder(base / "model", tiny(vocab_size=73448, eos_token_id=[2, 73440], initializer_range=0.3))
    save_draft(build_draft(load_model(model_dir).config, seed=1), base / "draft")
    return model_dir, base / "draft"


def _generate(capsys, *flags) -> tuple[int, str, str]:
    code = main(["generate", *flags, "-n", "12", "--temperature", "0", "--dtype", "float32", "Hello there"])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_with_a_draft_prints_the_same_text(capsys, folders):
    model_dir, draft = folders
    code, plain, _ = _generate(capsys, "--model", str(model_dir))
    assert code == 0
    code, spec, err = _generate(capsys, "--model", str(model_dir), "--draft", str(draft), "--tree-size", "6",
                                "--spec-num-iter", "3", "--spec-topk", "2")
    assert code == 0 and spec == plain and "tokens per verification" in err


@pytest.mark.parametrize("flags, message", [
    (["--frspec", "x.pt"], "--frspec needs --draft"),
    (["--draft", "/nonexistent"], "not a folder"),
    (["--draft", "DRAFT", "--engine", "reference"], "drop --engine reference"),
    (["--draft", "DRAFT", "--tree-size", "99"], "tree_size"),
])
def test_bad_speculative_flags_are_one_line_errors(capsys, folders, flags, message):
    model_dir, draft = folders
    flags = [str(draft) if f == "DRAFT" else f for f in flags]
    code, _, err = _generate(capsys, "--model", str(model_dir), *flags)
    assert code == 2 and message in err.strip().splitlines()[-1]
