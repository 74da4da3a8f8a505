"""Shared fixtures. The hub is never reached: models come from packages (OFFLINE.md)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the built-in smollm2-135m, converted once into the user
    cache (about 20 s the first time) and reused by every test of the session."""
    from cospadi.models import load_model

    return load_model("smollm2-135m")
