"""Fixtures of the speculative tests: the engine tests' tiny target and its plain greedy reference output."""

import pytest

from minicpm4.generate import generate
from tests.engine.test_engine import model  # noqa: F401  (the fixture: the same tiny target)
from tests.speculative.drafters import GREEDY, PROMPTS


@pytest.fixture(scope="module")
def reference(model):  # noqa: F811
    return [o.token_ids for o in generate(model, PROMPTS, GREEDY)]
