import os

import pytest

os.environ.setdefault("S2T_CACHE", os.path.join(os.path.dirname(__file__), "..", ".cache", "select2think"))


@pytest.fixture(scope="session")
def tiny_pair():
    from select2think import load_pair

    return load_pair("tiny-slm", "tiny-llm", dtype="fp32", device="cpu")


@pytest.fixture(scope="session")
def tokenizer(tiny_pair):
    return tiny_pair.tokenizer
