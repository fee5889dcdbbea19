"""Check the paper's claims on problems where the truth is known.

    python -m toy.verify_bounds [--only C4,C5] [--quick] [--seed N] [--out DIR]

Runs the claims C1-C11 of method.md section 7 (Gaussian and Gaussian-mixture data, where marginals, posteriors
and Bayes denoisers are exact), prints a table (claim, kind, verdict, key numbers) and writes ``report.md``,
``report.json`` and PNG figures to ``--out``. *Checks* are identities and bounds that must hold mathematically;
*measurements* report what adversarial training does, whichever way it goes. The exit code is 1 only when a
check fails (a bug, or a wrong statement); a measurement that contradicts the paper is a finding, not an error.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from theory.claims import CLAIM_IDS, Verdict, run_claims, select_claims


def _short(value: Any, width: int = 60) -> str:
    """A compact rendering of a quantity for the table."""
    if isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, list | tuple) and value and all(isinstance(v, int | float) for v in value):
        shown = ", ".join(f"{v:.3g}" for v in value[:4])
        text = f"[{shown}{', ...' if len(value) > 4 else ''}]"
    else:
        text = str(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def verdict_word(v: Verdict) -> str:
    if v.kind == "check":
        return "holds" if v.holds else "FAILS"
    return "as paper" if v.holds else "contrary"


def format_table(verdicts: list[Verdict]) -> str:
    rows = [f"{'claim':<6}{'kind':<13}{'verdict':<10}{'margin':>10}  {'key numbers'}"]
    for v in verdicts:
        keys = "; ".join(f"{k}={_short(q, 28)}" for k, q in list(v.quantities.items())[:3])
        margin = "nan" if math.isnan(v.margin) else f"{v.margin:.3g}"
        rows.append(f"{v.id:<6}{v.kind:<13}{verdict_word(v):<10}{margin:>10}  {_short(keys, 90)}")
    return "\n".join(rows)


def format_markdown(verdicts: list[Verdict], args: argparse.Namespace, seconds: float) -> str:
    lines = ["# verify_bounds report", "",
             f"`python -m toy.verify_bounds{' --quick' if args.quick else ''} --seed {args.seed}` "
             f"({seconds:.1f} s)", "",
             "| claim | kind | verdict | relation | margin | statement |", "|---|---|---|---|---|---|"]
    for v in verdicts:
        lines.append(f"| {v.id} | {v.kind} | {verdict_word(v)} | `{v.relation}` | {v.margin:.3g} | {v.statement} |")
    for v in verdicts:
        lines += ["", f"## {v.id}: {v.statement}", "", f"*{v.kind}*, {verdict_word(v)}, expected `{v.relation}`, "
                  f"margin {v.margin:.3g}, {v.seconds:.2f} s", ""]
        lines += [f"- `{k}`: {_short(q, 400)}" for k, q in v.quantities.items()]
        if v.notes:
            lines += ["", v.notes]
        lines += [f"\n![{v.id}]({Path(f).name})" for f in v.figures]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=None,
                   help=f"comma-separated claim ids to run (default: all of {','.join(CLAIM_IDS)})")
    p.add_argument("--quick", action="store_true", help="smaller problems and fewer samples (about 10 s)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice")
    p.add_argument("--out", type=Path, default=Path("verify_bounds_out"),
                   help="folder for report.md, report.json and figures (default: verify_bounds_out/)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    try:
        args.ids = select_claims(args.only)
    except ValueError as err:
        p.error(str(err))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    verdicts: list[Verdict] = []
    bar = tqdm(args.ids, desc="claims", disable=args.quiet)
    for cid in bar:
        bar.set_postfix_str(cid)
        verdicts += run_claims([cid], quick=args.quick, seed=args.seed, out=args.out)
    seconds = time.perf_counter() - start
    report = {"command": " ".join(["python -m toy.verify_bounds", *(argv if argv is not None else sys.argv[1:])]),
              "quick": args.quick, "seed": args.seed, "seconds": seconds,
              "claims": [v.to_json() for v in verdicts]}
    (args.out / "report.json").write_text(json.dumps(report, indent=2, default=float))
    (args.out / "report.md").write_text(format_markdown(verdicts, args, seconds))
    print(format_table(verdicts))
    failed = [v.id for v in verdicts if v.kind == "check" and not v.holds]
    print(f"\n{len(verdicts)} claims in {seconds:.1f} s; report in {args.out}/report.md"
          + (f"; FAILED checks: {', '.join(failed)}" if failed else "; every check holds"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
