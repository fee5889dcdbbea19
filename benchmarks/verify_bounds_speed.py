"""Wall time of ``python -m toy.verify_bounds`` (full and ``--quick``), per claim, against the targets
(full <= 60 s, quick <= 10 s on a 2-core CPU).

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

TARGETS = {"quick": 10.0, "full": 60.0}


def time_mode(quick: bool) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "toy.verify_bounds", "--out", out, "--quiet"] + (["--quick"] if quick else [])
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - start
        report = json.loads((Path(out) / "report.json").read_text())
    return {"wall_seconds": wall, "exit_code": proc.returncode,
            "per_claim": {c["id"]: c["seconds"] for c in report["claims"]}}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, default=None, help="write the timings as JSON here")
    p.add_argument("--skip-full", action="store_true", help="time only --quick")
    args = p.parse_args(argv)
    modes = ["quick"] + ([] if args.skip_full else ["full"])
    result = {mode: time_mode(mode == "quick") for mode in modes}
    for mode, r in result.items():
        ok = "within" if r["wall_seconds"] <= TARGETS[mode] else "OVER"
        print(f"{mode:<6} {r['wall_seconds']:6.1f} s  ({ok} the {TARGETS[mode]:.0f} s target; exit {r['exit_code']})")
        print("       " + "  ".join(f"{k} {v:.2f}" for k, v in r["per_claim"].items()))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
