"""Wall time of ``python -m toy.verify_bounds`` (full and ``--quick``), per claim, against the targets
(full <= 60 s, quick <= 10 s on a 2-core CPU). ``--quick --figures`` (quick problems, figures drawn) is timed
too, for information (drawing the PNGs is about a third of a quick run).

    python -m benchmarks.verify_bounds_speed [--json PATH] [--skip-full]

Each mode runs in a fresh subprocess (imports included, as a user sees it); per-claim seconds come from the
report.json it writes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: mode -> (command-line arguments, target seconds or None)
MODES = {"quick": (["--quick"], 10.0), "quick+figures": (["--quick", "--figures"], None), "full": ([], 60.0)}


def time_mode(mode: str) -> dict:
    """Run ``python -m toy.verify_bounds`` in ``mode`` (a key of :data:`MODES`) in a fresh subprocess."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "toy.verify_bounds", "--out", out, "--quiet", *MODES[mode][0]]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - start
        report = json.loads((Path(out) / "report.json").read_text())
    return {"wall_seconds": wall, "exit_code": proc.returncode,
            "per_claim": {c["id"]: c["seconds"] for c in report["claims"]}}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, default=None, help="write the timings as JSON here")
    p.add_argument("--skip-full", action="store_true", help="time only the --quick modes")
    args = p.parse_args(argv)
    modes = [m for m in MODES if not (args.skip_full and m == "full")]
    result = {mode: time_mode(mode) for mode in modes}
    for mode, r in result.items():
        target = MODES[mode][1]
        verdict = "no target" if target is None else \
            f"{'within' if r['wall_seconds'] <= target else 'OVER'} the {target:.0f} s target"
        print(f"{mode:<13} {r['wall_seconds']:6.1f} s  ({verdict}; exit {r['exit_code']})")
        print("       " + "  ".join(f"{k} {v:.2f}" for k, v in r["per_claim"].items()))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
