import os

import pytest
import torch
from hypothesis import settings

# CI has two cores; keep hypothesis fast and free of wall-clock flakiness.
settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True)
settings.register_profile("dev", max_examples=25, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def one_thread():
    """Tiny tensors: one intra-op thread avoids the two-thread synchronisation cost (badly so on a busy 2-core
    host). Use it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
