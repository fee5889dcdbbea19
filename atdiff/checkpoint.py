"""Checkpoints and random-number state: a verified pair of files, exact resume, loading with ``weights_only=True``.

A checkpoint ``run/ckpt.pt`` is two files:

* ``run/ckpt.pt``: the state, written by ``torch.save`` and read back with ``torch.load(weights_only=True)``;
* ``run/ckpt.pt.json`` (the *sidecar*, always the full file name plus ``.json``): the run's ``config``, the
  sha256 and size of the checkpoint bytes, and the same for the previous checkpoint of that name.

Saving checks the whole state first (nothing is written if any entry could not be loaded again), then writes both
files under temporary names, flushes them to disk, and renames the sidecar first and the checkpoint second. The new
sidecar still describes the previous checkpoint, so a crash between the two renames leaves the previous checkpoint
with a sidecar that knows it: loading verifies the bytes against either entry and takes the config that belongs to
the bytes on disk. Loading checks every target before changing any of them.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import re
import secrets
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["seed_everything", "save_checkpoint", "load_checkpoint", "read_config", "sidecar_path", "rng_state",
           "set_rng_state"]

FORMAT = "atdiff-checkpoint"
VERSION = 1
_META = "__atdiff__"  # payload entry with the kind of every saved entry
_RESERVED = ("rng", "config", _META)
_LEAVES = (bool, int, float, complex, str, bytes, type(None), torch.Size, torch.dtype, torch.device)
_CHUNK = 1 << 20


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """The global RNG states (Python, NumPy, torch CPU and CUDA) as tensors, lists and numbers only, so that
    they can be stored in a checkpoint as they are (e.g. every rank's state, gathered on rank 0)."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return _encode_rng(state)


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned (also after a round trip through a checkpoint)."""
    random.setstate(_to_tuple(state["python"]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.asarray(np_state[1], dtype=np.uint32), *np_state[2:]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _to_tuple(x: Any) -> Any:
    return tuple(_to_tuple(v) for v in x) if isinstance(x, list | tuple) else x


def _encode_rng(state: dict[str, Any]) -> dict[str, Any]:
    """Make RNG states loadable with ``weights_only=True`` (tensors, lists, numbers and strings only)."""
    enc = dict(state)
    enc["numpy"] = [str(state["numpy"][0]), torch.from_numpy(state["numpy"][1].astype(np.int64)),
                    *[int(v) if isinstance(v, int | np.integer) else float(v) for v in state["numpy"][2:]]]
    enc["python"] = [state["python"][0], list(state["python"][1]), state["python"][2]]
    if "cuda" in state:
        enc["cuda"] = list(state["cuda"])
    return enc


# ----------------------------------------------------------------------------------------------- file names


def sidecar_path(path: str | os.PathLike) -> Path:
    """The sidecar of checkpoint ``path``: the full file name plus ``.json`` (``a.pt`` -> ``a.pt.json``)."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def _check_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.name in ("", ".", ".."):
        raise ValueError(f"path: {str(path)!r} is not a file name")
    if path.suffix.lower() == ".json":
        raise ValueError(f"path: {path} ends in .json, the suffix of checkpoint sidecars; use e.g. '.pt'")
    if path.is_dir():
        raise ValueError(f"path: {path} is a directory")
    return path


def _temp_pattern(path: Path) -> re.Pattern:
    return re.compile(rf"^\.{re.escape(path.name)}(\.json)?\.tmp-[0-9a-f]{{16}}$")


def _clean_stale_temps(path: Path) -> None:
    """Remove the temporary files that an interrupted save of ``path`` left behind (none of another checkpoint)."""
    pattern = _temp_pattern(path)
    for entry in path.parent.iterdir():
        if pattern.match(entry.name):
            entry.unlink(missing_ok=True)


def _file_digest(path: Path) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _write_new_file(path: Path, write: Callable[[Any], None]) -> None:
    """Create ``path`` (mode from the umask, like any new file), write it and flush it to disk."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    with os.fdopen(fd, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _read_sidecar(path: Path) -> dict[str, Any] | None:
    side = sidecar_path(path)
    if not side.is_file():
        return None
    try:
        meta = json.loads(side.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"path: the sidecar {side} is not readable JSON ({err})") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("current"), dict):
        raise ValueError(f"path: {side} is not an atdiff checkpoint sidecar")
    return meta


def _entry_of(meta: dict[str, Any] | None, digest: str, size: int) -> tuple[dict[str, Any] | None, bool]:
    """The sidecar entry that describes bytes with ``digest``: (entry, is_current), or (None, False)."""
    if meta is None:
        return None, False
    for key, is_current in (("current", True), ("previous", False)):
        entry = meta.get(key)
        if isinstance(entry, dict) and entry.get("sha256") == digest and entry.get("size") == size:
            return entry, is_current
    return None, False


# ----------------------------------------------------------------------------------------------- saving


def _check_storable(obj: Any, where: str, seen: set[int]) -> None:
    """Raise ``ValueError`` naming ``where`` unless ``torch.load(weights_only=True)`` can read ``obj`` back."""
    if type(obj) in _LEAVES:
        return
    if type(obj) in (torch.Tensor, nn.Parameter):
        return
    if isinstance(obj, np.ndarray | np.generic):
        raise ValueError(f"{where}: is a NumPy {type(obj).__name__} ({obj.dtype}), which a weights-only load "
                         f"refuses; convert it explicitly (torch.from_numpy(a) for arrays, int(x) / float(x) for "
                         f"scalars)")
    if type(obj) in (dict, OrderedDict, list, tuple, set, frozenset):
        if id(obj) in seen:
            raise ValueError(f"{where}: contains itself")
        seen.add(id(obj))
        if isinstance(obj, dict):
            for k, v in obj.items():
                _check_storable(k, f"{where} key {k!r}", seen)
                _check_storable(v, f"{where}[{k!r}]", seen)
        else:
            for i, v in enumerate(obj):
                _check_storable(v, f"{where}[{i}]", seen)
        seen.discard(id(obj))
        return
    raise ValueError(f"{where}: a {type(obj).__module__}.{type(obj).__qualname__} cannot be read back by a "
                     f"weights-only load; store tensors, numbers, strings, None, lists/tuples/dicts of those, "
                     f"objects with state_dict(), or a torch.Generator")


def _encode_entry(name: str, value: Any) -> tuple[str, Any]:
    """(kind, stored value) of one keyword of :func:`save_checkpoint`."""
    if isinstance(value, torch.Generator):
        return "generator", value.get_state()
    if hasattr(value, "state_dict") and callable(value.state_dict) and not isinstance(value, torch.Tensor):
        stored = value.state_dict()
        if not isinstance(stored, Mapping):
            raise ValueError(f"{name}: state_dict() returned a {type(stored).__name__}, not a dict")
        _check_storable(stored, f"{name}.state_dict()", set())
        return "state_dict", stored
    _check_storable(value, name, set())
    return "value", value


def save_checkpoint(path: str | os.PathLike, *, config: dict[str, Any] | None = None, **state: Any) -> Path:
    """Write ``state`` to ``path`` and the sidecar ``<path>.json`` (config and content hash), crash-safely.

    Each keyword of ``state`` is stored as: ``obj.state_dict()`` for an object that has one (model, optimiser,
    EMA, GradScaler, loss, data stream), the state of a ``torch.Generator`` (restored into a generator target by
    :func:`load_checkpoint`), or the value itself if it is a tensor, a number, a string, ``None`` or a
    list/tuple/dict of those. Anything else, including NumPy arrays and NumPy scalars (convert them explicitly:
    ``torch.from_numpy(a)``, ``int(x)``), raises ``ValueError`` naming the entry BEFORE any file is written.
    The global RNG states are stored under ``"rng"`` (so ``rng``, ``config`` and ``__atdiff__`` are reserved).

    ``config`` (JSON-serialisable, e.g. the recipe) goes into the sidecar. The sidecar is named by the full
    file name (``a.pt`` -> ``a.pt.json``), so ``a.pt`` and ``a.pth`` never share one; a ``.json`` checkpoint
    path is refused. Both files are written under temporary names, flushed, and renamed sidecar first; the
    sidecar also describes the previous checkpoint, so a crash at any point leaves a loadable, verified pair
    (the previous one or the new one). Temporary files of an interrupted save of the same path are removed.
    Files get the mode the umask gives. One process writes a given path at a time (e.g. rank 0). Returns ``path``.
    """
    path = _check_path(path)
    for name in state:
        if name in _RESERVED:
            raise ValueError(f"{name}: is a reserved checkpoint entry name")
    kinds, payload = {}, {}
    for name, value in state.items():
        kinds[name], payload[name] = _encode_entry(name, value)
    try:
        config_text = json.dumps(config, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(f"config: is not JSON-serialisable ({err})") from err
    payload["rng"] = rng_state()
    payload[_META] = {"format": FORMAT, "version": VERSION, "kinds": kinds}

    path.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale_temps(path)
    previous = None
    if path.is_file():
        try:
            old_meta = _read_sidecar(path)
        except ValueError:
            old_meta = None
        digest, size = _file_digest(path)
        previous, _ = _entry_of(old_meta, digest, size)  # None if the file on disk is not verified
    token = secrets.token_hex(8)
    tmp_ckpt = path.with_name(f".{path.name}.tmp-{token}")
    tmp_side = path.with_name(f".{path.name}.json.tmp-{token}")
    try:
        _write_new_file(tmp_ckpt, lambda f: torch.save(payload, f))
        digest, size = _file_digest(tmp_ckpt)
        meta = {"format": FORMAT, "version": VERSION, "checkpoint": path.name,
                "current": {"sha256": digest, "size": size, "config": json.loads(config_text)},
                "previous": previous}
        text = json.dumps(meta, indent=2, allow_nan=False).encode()
        _write_new_file(tmp_side, lambda f: f.write(text))
        os.replace(tmp_side, sidecar_path(path))
        os.replace(tmp_ckpt, path)
        _fsync_dir(path.parent)
    except BaseException:
        for tmp in (tmp_ckpt, tmp_side):
            tmp.unlink(missing_ok=True)
        raise
    return path


# ----------------------------------------------------------------------------------------------- loading


def _verified_meta(path: Path) -> tuple[dict[str, Any], bool]:
    """The sidecar entry that matches the bytes of ``path`` and whether it is the newest save."""
    if not path.is_file():
        raise FileNotFoundError(f"path: no checkpoint at {path}")
    meta = _read_sidecar(path)
    if meta is None:
        raise ValueError(f"path: {path} has no sidecar {sidecar_path(path).name} with its content hash; it was not "
                         f"written by atdiff.checkpoint.save_checkpoint (or the sidecar was removed)")
    digest, size = _file_digest(path)
    entry, is_current = _entry_of(meta, digest, size)
    if entry is None:
        raise ValueError(f"path: {path} does not match the sha256 in {sidecar_path(path).name}: the file is "
                         f"truncated, corrupted or was replaced")
    return entry, is_current


def read_config(path: str | os.PathLike) -> Any:
    """The ``config`` saved with the checkpoint at ``path`` (the one that belongs to the bytes on disk)."""
    entry, _ = _verified_meta(_check_path(path))
    return entry.get("config")


def _check_module(name: str, module: nn.Module, saved: Mapping, path: Path) -> None:
    expected = module.state_dict()
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{name}: the state_dict in {path} does not fit (missing keys {missing[:5]}, "
                         f"unexpected keys {unexpected[:5]})")
    for key, value in expected.items():
        if isinstance(value, torch.Tensor) and isinstance(value, nn.parameter.UninitializedTensorMixin):
            continue
        if isinstance(value, torch.Tensor) != isinstance(saved[key], torch.Tensor):
            raise ValueError(f"{name}: entry {key!r} in {path} is a {type(saved[key]).__name__}, "
                             f"expected {type(value).__name__}")
        if isinstance(value, torch.Tensor) and value.shape != saved[key].shape:
            raise ValueError(f"{name}: entry {key!r} in {path} has shape {tuple(saved[key].shape)}, the target "
                             f"has {tuple(value.shape)}")


def _check_optimizer(name: str, opt: torch.optim.Optimizer, saved: Mapping, path: Path) -> None:
    groups = saved.get("param_groups")
    if not isinstance(groups, list) or not isinstance(saved.get("state"), Mapping):
        raise ValueError(f"{name}: the entry in {path} is not an optimizer state_dict")
    if len(groups) != len(opt.param_groups):
        raise ValueError(f"{name}: {path} has {len(groups)} parameter groups, the optimizer {len(opt.param_groups)}")
    params = []
    for i, (g_saved, g) in enumerate(zip(groups, opt.param_groups, strict=True)):
        if len(g_saved.get("params", ())) != len(g["params"]):
            raise ValueError(f"{name}: parameter group {i} in {path} has {len(g_saved.get('params', ()))} "
                             f"parameters, the optimizer's has {len(g['params'])}")
        params += list(zip(g_saved["params"], g["params"], strict=True))
    index = dict(params)
    for key, entry in saved["state"].items():
        if key not in index:
            raise ValueError(f"{name}: {path} has state for parameter {key!r}, which no parameter group lists")
        p = index[key]
        for sub, value in (entry.items() if isinstance(entry, Mapping) else ()):
            # moment buffers have the parameter's shape (factored states of lower rank are not compared)
            if isinstance(value, torch.Tensor) and value.dim() == p.dim() > 0 and value.shape != p.shape:
                raise ValueError(f"{name}: state {sub!r} of parameter {key} in {path} has shape "
                                 f"{tuple(value.shape)}, the parameter {tuple(p.shape)}")


def _check_target(name: str, target: Any, kind: str, saved: Any, path: Path) -> None:
    if isinstance(target, torch.Generator):
        if kind != "generator":
            raise ValueError(f"{name}: {path} holds a {kind} entry under this name, not a torch.Generator state")
        reference = target.get_state()
        if not isinstance(saved, torch.Tensor) or saved.dtype != torch.uint8 or saved.shape != reference.shape:
            raise ValueError(f"{name}: the generator state in {path} does not fit this generator "
                             f"(device {target.device})")
        return
    if not callable(getattr(target, "load_state_dict", None)):
        raise ValueError(f"{name}: a {type(target).__name__} has no load_state_dict and is not a torch.Generator")
    if kind == "generator" or not isinstance(saved, Mapping):  # a dict saved as a value is fine (a state_dict)
        raise ValueError(f"{name}: {path} holds a {kind} entry under this name, not a state_dict")
    if isinstance(target, nn.Module):
        _check_module(name, target, saved, path)
    elif isinstance(target, torch.optim.Optimizer):
        _check_optimizer(name, target, saved, path)


def load_checkpoint(path: str | os.PathLike, *, restore_rng: bool = True, map_location: Any = "cpu",
                    **targets: Any) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`, verified and all-or-nothing.

    ``path``'s bytes must match the sha256 in its sidecar (else ``ValueError`` naming the file: truncated,
    corrupted, foreign); they are read with ``torch.load(weights_only=True)``. Each keyword target (e.g.
    ``model=net, optimizer=opt, ema=ema, generator=gen``) receives the entry of that name: ``load_state_dict``
    for objects, ``set_state`` for a ``torch.Generator``. Everything is checked before any target changes:
    every entry is present, a module's keys and shapes equal the saved ones, an optimiser has the saved
    parameter groups and sizes, a generator state fits. Other objects (EMA, scaler, ...) are loaded first and
    rolled back to their previous state if one of them raises. The global RNG states are restored last
    if ``restore_rng``.

    Returns the payload: every saved entry by name (state_dicts, generator states as uint8 tensors, values),
    ``"rng"``, and ``"config"`` (the config that belongs to these bytes). If a save was interrupted between its
    two renames, the previous checkpoint is loaded (with a warning).
    """
    path = _check_path(path)
    entry, is_current = _verified_meta(path)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for a corrupt zip or a refused global
        raise ValueError(f"path: {path} is not a readable checkpoint ({type(err).__name__}: {err})") from err
    meta = payload.get(_META) if isinstance(payload, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("kinds"), dict):
        raise ValueError(f"path: {path} does not hold an atdiff checkpoint")
    if not is_current:
        warnings.warn(f"{path}: the last save of this checkpoint was interrupted; loading the previous one",
                      stacklevel=2)
    kinds = meta["kinds"]
    for name, target in targets.items():
        if name not in kinds:
            raise ValueError(f"{name}: not in checkpoint {path} (it has {sorted(kinds)})")
        _check_target(name, target, kinds[name], payload[name], path)

    plain = [n for n, t in targets.items() if not isinstance(t, nn.Module | torch.optim.Optimizer | torch.Generator)]
    snapshots, done = {}, []
    try:
        for name in plain:
            snapshots[name] = copy.deepcopy(targets[name].state_dict())
            done.append(name)  # touched (a failing load may have changed part of it)
            targets[name].load_state_dict(payload[name])
    except Exception as err:
        for loaded in done:
            targets[loaded].load_state_dict(snapshots[loaded])
        raise ValueError(f"{name}: its entry in {path} could not be loaded ({type(err).__name__}: {err}); "
                         f"no target was changed") from err
    for name, target in targets.items():
        if isinstance(target, torch.Generator):
            target.set_state(payload[name].cpu())
        elif name not in plain:
            target.load_state_dict(payload[name])
    if restore_rng and "rng" in payload:
        set_rng_state(payload["rng"])
    result = {k: v for k, v in payload.items() if k != _META}
    result["config"] = entry.get("config")
    return result
