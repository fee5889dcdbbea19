import os

import torch
from hypothesis import settings

# CI has two cores; keep hypothesis fast and free of wall-clock flakiness.
settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True)
settings.register_profile("dev", max_examples=25, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")
torch.set_num_threads(min(2, torch.get_num_threads()))
