"""Checkpoints and random-number state: atomic writes, exact resume, loading with ``weights_only=True``."""

from __future__ import annotations

import json
import os
import random
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["seed_everything", "save_checkpoint", "load_checkpoint", "rng_state", "set_rng_state"]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """The global RNG states (Python, NumPy, torch CPU and CUDA), as tensors and plain types."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(_to_tuple(state["python"]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.asarray(np_state[1], dtype=np.uint32), *np_state[2:]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_tuple(x: Any) -> Any:
    return tuple(_to_tuple(v) for v in x) if isinstance(x, list | tuple) else x


def _encode_rng(state: dict[str, Any]) -> dict[str, Any]:
    """Make RNG states loadable with ``weights_only=True`` (tensors, lists, numbers and strings only)."""
    enc = dict(state)
    enc["numpy"] = [state["numpy"][0], torch.from_numpy(state["numpy"][1].astype(np.int64)),
                    *[int(v) if isinstance(v, int | np.integer) else float(v) for v in state["numpy"][2:]]]
    enc["python"] = [state["python"][0], list(state["python"][1]), state["python"][2]]
    return enc


def save_checkpoint(path: str | os.PathLike, *, config: dict[str, Any] | None = None, **state: Any) -> Path:
    """Write ``state`` (state_dicts, tensors, numbers) atomically to ``path``, plus ``config`` as JSON in a
    ``.json`` file beside it. RNG states are included under ``"rng"``. Loadable with ``weights_only=True``.

    The file is written to a temporary name in the same folder and renamed over ``path``, so a crash leaves
    either the old or the new checkpoint, never a torn one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {k: (v.state_dict() if hasattr(v, "state_dict") else v) for k, v in state.items()}
    payload["rng"] = _encode_rng(rng_state())
    _atomic_write(path, lambda f: torch.save(payload, f))
    if config is not None:
        _atomic_write(path.with_suffix(".json"), lambda f: f.write(json.dumps(config, indent=2).encode()))
    return path


def _atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path: str | os.PathLike, *, restore_rng: bool = True, map_location: Any = "cpu",
                    **targets: Any) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` with ``weights_only=True``.

    Each keyword target (e.g. ``model=net, optimizer=opt, ema=ema``) gets ``load_state_dict`` of the entry
    of that name; a missing entry raises ``KeyError`` naming it. Restores the RNG states if ``restore_rng``.
    Returns the whole payload (e.g. for ``payload["step"]``). A truncated or corrupt file raises
    ``ValueError`` naming the path.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: no checkpoint at {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for a corrupt zip
        raise ValueError(f"path: {path} is not a readable checkpoint ({type(err).__name__}: {err})") from err
    if not isinstance(payload, dict):
        raise ValueError(f"path: {path} does not hold a checkpoint dictionary")
    for name, obj in targets.items():
        if name not in payload:
            raise KeyError(f"{name}: not in checkpoint {path} (it has {sorted(payload)})")
        obj.load_state_dict(payload[name])
    if restore_rng and "rng" in payload:
        set_rng_state(payload["rng"])
    return payload
