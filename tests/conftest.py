import os

import pytest
import torch
from hypothesis import settings

from atdiff import threads

# CI has two cores; keep hypothesis fast and free of wall-clock flakiness.
settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True)
settings.register_profile("dev", max_examples=25, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def one_thread():
    """Tiny tensors: one intra-op thread avoids the two-thread synchronisation cost (badly so on a busy 2-core
    host). Use it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    with threads.one_thread():
        yield


@pytest.fixture(scope="session")
def tiny_digits_runs(tmp_path_factory):
    """Two tiny digits runs of the launcher (2 steps each): ``root / "plain"`` (unconditional) and ``root / "cond"``
    (class-conditional), for the sampling and sweep CLIs."""
    from benchmarks import train as launcher
    from benchmarks.recipes import resolve

    root = tmp_path_factory.mktemp("runs")
    common = ["network.model_channels=8", "network.num_head_channels=4", "diffusion.steps=20", "optim.batch_size=8",
              "train.steps=2", "train.sample_steps=2", "train.num_samples=4"]
    with threads.one_thread():
        launcher.train(resolve("digits-std", [*common, "data.class_cond=True", "network.num_classes=10"]),
                       root / "cond", progress=False)
        launcher.train(resolve("digits-std", common), root / "plain", progress=False)
    return root
