"""The README's promises: its commands match CI, and its code example runs and trains."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_readme_opens_with_the_main_job_and_the_tests():
    commands = [ln for ln in _blocks("bash")[0].splitlines() if ln and not ln.startswith("#")]
    assert len(commands) == 2
    install = "python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 -e '.[dev]'"
    assert commands[0] == f"{install} && .venv/bin/python -m toy.verify_bounds"
    assert commands[1] == f"{install} && .venv/bin/python -m pytest -q"
    ci = (ROOT / ".ci" / "run").read_text()  # CI installs exactly as the README says
    assert "pip install -q torch==2.13.0 -e '.[dev]'" in ci and "-m pytest -q" in ci


def test_readme_example_trains_with_free_at_and_samples():
    code = _blocks("python")[0]
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["result"].nfe == 25
    assert namespace["stats"]["updates"] == 3
    # an untrained MLP lands at W2 ~ 45 on this mixture and the two-sample floor at n = 1000 is ~0.25
    assert namespace["w2"] < 0.6, namespace["w2"]


def test_every_other_readme_python_block_runs():
    for code in _blocks("python")[1:]:
        namespace: dict = {}
        exec(compile(code, "README.md", "exec"), namespace)
        if "images" in namespace:  # the conditioning example: one guided sample per label
            assert namespace["images"].shape == (4, 1, 8, 8) and bool(namespace["images"].isfinite().all())
