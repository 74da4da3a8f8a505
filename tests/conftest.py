"""Shared fixtures. The hub is never reached: models come from packages (OFFLINE.md)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def single_thread():
    """The tests use tiny matrices: one intra-op thread avoids spin contention on a
    shared 2-core machine and keeps results independent of the thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the built-in smollm2-135m, converted once into the user
    cache (about 20 s the first time) and reused by every test of the session."""
    from cospadi.models import load_model

    return load_model("smollm2-135m")
