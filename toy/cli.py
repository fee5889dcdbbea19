"""Checks the toy commands share: flags that would fail after minutes of work are refused before it starts."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def check_json_path(parser: argparse.ArgumentParser, path: Path | None) -> None:
    """Refuse (``parser.error``, exit 2) a ``--json`` path that cannot be written: create its folder and a probe file
    there now, not after the run."""
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            raise IsADirectoryError(str(path))
        with tempfile.NamedTemporaryFile(dir=path.parent):
            pass
    except OSError as err:
        parser.error(f"--json {path} cannot be written: {err}")
