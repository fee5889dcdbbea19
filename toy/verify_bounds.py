"""Check the paper's claims on problems where the truth is known.

    python -m toy.verify_bounds [--only C4,C5] [--quick] [--seed N] [--out DIR] [--figures | --no-figures]

Runs the claims C1-C11 of Wang et al. 2025 as ``docs/claims.md`` states them (Gaussian and Gaussian-mixture data,
where marginals, posteriors and Bayes denoisers are exact), prints a table (claim, kind, verdict, key numbers) and
writes ``report.md``, ``report.json`` and PNG figures to ``--out`` (``--quick`` skips the figures unless
``--figures`` is given). *Checks* are identities and bounds that must hold mathematically; *measurements* report
what adversarial training does, whichever way it goes. A measurement's sub-checks (cross-checks, Monte Carlo
against closed forms) must hold too; only the direction of a measured effect is free.

The run is written into a fresh folder beside ``--out`` and moved into place only when complete, so ``--out``
never mixes two runs.

exit codes:
  0  every check and sub-check holds
  1  a check or a sub-check failed (a bug, or a wrong statement)
  2  bad usage (unknown claim id, bad --seed, ...)
  3  the run crashed (an exception, an unwritable --out); the previous report, if any, is left untouched
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from theory.claims import CLAIM_IDS, Verdict, run_claims, select_claims
from theory.estimators import reference_pair_errors

#: sample sizes and seeds of the estimator-accuracy figure (exact W2 is roughly cubic in n)
ESTIMATOR_NS = {"quick": ((200, 400, 800), 3), "full": ((200, 400, 800, 1600), 4)}


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
    """``holds`` / ``FAILS`` for a check (``holds (restated)`` when the paper's wording fails but the restatement
    holds), ``as paper`` / ``contrary`` for a measurement; ``SUBCHECK FAILED`` when a sub-check failed."""
    if v.failed_subchecks:
        return "SUBCHECK FAILED"
    if v.kind == "check":
        word = "holds" if v.holds else "FAILS"
        return f"{word} (restated)" if v.as_stated is False else word
    return "as paper" if v.holds else "contrary"


def format_table(verdicts: list[Verdict]) -> str:
    rows = [f"{'claim':<6}{'kind':<13}{'verdict':<18}{'margin':>9}  {'key numbers'}"]
    for v in verdicts:
        keys = "; ".join(f"{k}={_short(q, 28)}" for k, q in list(v.quantities.items())[:3])
        margin = "nan" if math.isnan(v.margin) else f"{v.margin:.3g}"
        rows.append(f"{v.id:<6}{v.kind:<13}{verdict_word(v):<18}{margin:>9}  {_short(keys, 84)}")
        if v.as_stated is False:
            rows.append(f"{'':<6}{'':<13}{'fails as stated':<18}{'':>9}  {_short(v.restatement, 84)}")
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
        if v.as_stated is False:
            lines += ["**Fails as stated, holds restated:** " + v.restatement, ""]
        if v.subchecks:
            lines += ["Sub-checks: " + ", ".join(f"`{k}` {'ok' if ok else 'FAILED'}" for k, ok in v.subchecks.items()),
                      ""]
        lines += [f"- `{k}`: {_short(q, 400)}" for k, q in v.quantities.items()]
        if v.notes:
            lines += ["", v.notes]
        lines += [f"\n![{v.id}]({Path(f).name})" for f in v.figures]
    return "\n".join(lines) + "\n"


def plot_estimator_errors(errors: dict[str, dict[str, list[float]]], path: Path) -> Path:
    """Relative error (mean +- sd over seeds) of each sample estimator against n, on the reference pair of
    :mod:`theory.estimators`; the W2 floor (two samples of one law) in units of the true W2."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = errors["n"]["n"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in ("w2_exact", "w2_exact_floor", "w2_sliced", "kl_knn", "kl_monte_carlo"):
        ax.errorbar(n, errors[name]["mean"], yerr=errors[name]["sd"], marker="o", capsize=3, label=name)
    ax.axhline(0.0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("samples n (per law)")
    ax.set_ylabel("relative error (estimate / truth - 1)")
    ax.set_title("estimators on N(0, I) vs N((1, .6), diag(2, .4))")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)
    return path


def format_estimators(errors: dict[str, dict[str, list[float]]]) -> list[str]:
    """The estimator-accuracy table of report.md."""
    n = errors["n"]["n"]
    lines = ["", "## Estimators: relative error against n", "",
             "Reference pair of `theory.estimators` (truth: W2 = {w2:.4f}, SW2 = {sw2:.4f}, KL = {kl:.4f}); "
             "mean (sd) over seeds. `w2_exact_floor` is W2 between two samples of the same law, in units of the "
             "true W2: a measured W2 below it says nothing.".format(**{k: v[0] for k, v in errors["truth"].items()}),
             "", "| estimator | " + " | ".join(f"n = {int(v)}" for v in n) + " |", "|---|" + "---|" * len(n)]
    for name in ("w2_exact", "w2_exact_floor", "w2_sliced", "kl_knn", "kl_monte_carlo"):
        cells = [f"{m:+.3f} ({sd:.3f})" for m, sd in zip(errors[name]["mean"], errors[name]["sd"], strict=True)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


#: the largest seed torch's generators accept without wrapping around
MAX_SEED = 2**63 - 1


def _seed(text: str) -> int:
    """argparse type of ``--seed``: an integer in ``0..2**63 - 1``."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected an integer in 0..2**63-1, got {text}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; bad usage exits with code 2 and a message naming the flag."""
    p = argparse.ArgumentParser(prog="python -m toy.verify_bounds", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=None,
                   help=f"comma-separated claim ids to run, case-insensitive, repeats run once (default: all of "
                        f"{','.join(CLAIM_IDS)})")
    p.add_argument("--quick", action="store_true", help="smaller problems and fewer samples (about 10 s)")
    p.add_argument("--seed", type=_seed, default=0, help="seed of every random choice, 0..2**63-1 (default 0)")
    p.add_argument("--out", type=Path, default=Path("verify_bounds_out"),
                   help="folder for report.md, report.json and figures (default: verify_bounds_out/); replaced "
                        "as a whole when the run completes, so it must be new, empty or an earlier report")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--figures", action=argparse.BooleanOptionalAction, default=None,
                   help="write the PNG figures (default: yes, except with --quick, where drawing them would take "
                        "about a third of the run)")
    args = p.parse_args(argv)
    if args.figures is None:
        args.figures = not args.quick
    try:
        args.ids = select_claims(args.only)
    except ValueError as err:
        p.error(f"--{err}")
    if args.out.exists() and not args.out.is_dir():
        p.error(f"--out: {args.out} exists and is not a folder")
    if args.out.is_dir() and not is_report_folder(args.out):
        p.error(f"--out: {args.out} holds files other than a verify_bounds report (report.md, report.json, PNG "
                "figures); it would be replaced as a whole: choose a new or empty folder")
    return args


def is_report_folder(path: Path) -> bool:
    """Whether ``path`` holds nothing but what a run writes (report.md, report.json, PNG figures), so that
    replacing it as a whole loses nothing else."""
    return all(f.is_file() and (f.suffix == ".png" or f.name in ("report.md", "report.json")) for f in path.iterdir())


def run(args: argparse.Namespace, argv: list[str] | None, work: Path) -> tuple[list[Verdict], dict, str]:
    """Run the selected claims writing figures into ``work``; returns the verdicts, report.json and report.md."""
    start = time.perf_counter()
    verdicts: list[Verdict] = []
    bar = tqdm(args.ids, desc="claims", disable=args.quiet)  # the estimator figure follows (~1-5 s)
    for cid in bar:
        bar.set_postfix_str(cid)
        verdicts += run_claims([cid], quick=args.quick, seed=args.seed, out=work if args.figures else None)
    bar.close()
    errors = None
    if args.only is None:  # the estimator figure belongs to a whole run, not to a selection of claims
        ns, seeds = ESTIMATOR_NS["quick" if args.quick else "full"]
        errors = reference_pair_errors(ns, seeds)
        if args.figures:
            plot_estimator_errors(errors, work / "estimators_vs_n.png")
    seconds = time.perf_counter() - start
    for v in verdicts:  # figures are reported by their name inside --out
        v.figures = [str(args.out / Path(f).name) for f in v.figures]
    report = {"command": " ".join(["python -m toy.verify_bounds", *(argv if argv is not None else sys.argv[1:])]),
              "quick": args.quick, "seed": args.seed, "seconds": seconds,
              "claims": [v.to_json() for v in verdicts]}
    if errors is not None:
        report["estimators"] = errors
    markdown = format_markdown(verdicts, args, seconds)
    if errors is not None:
        figure = ["", "![estimators](estimators_vs_n.png)"] if args.figures else []
        markdown += "\n".join(format_estimators(errors) + figure) + "\n"
    return verdicts, report, markdown


def publish(work: Path, out: Path) -> None:
    """Replace ``out`` by the complete run in ``work`` (a sibling folder): rename the old one aside, move the new
    one in, delete the old one."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        old.rmdir()
        out.rename(old)
    work.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit code (0 ok, 1 a check failed, 2 bad usage, 3 crash)."""
    try:
        args = parse_args(argv)
    except SystemExit as exc:  # argparse: --help exits 0, bad usage 2
        return int(exc.code or 0)
    work = None
    try:
        parent = args.out.resolve().parent
        parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{args.out.name}.partial-", dir=parent))
        verdicts, report, markdown = run(args, argv, work)
        print(format_table(verdicts))
        (work / "report.json").write_text(json.dumps(report, indent=2, default=float))
        (work / "report.md").write_text(markdown)
        publish(work, args.out)
        work = None
    except KeyboardInterrupt:
        print("interrupted; --out left as it was", file=sys.stderr)
        return 3
    except Exception:  # a crash, never confused with a failed check
        traceback.print_exc()
        print(f"verify_bounds crashed; --out ({args.out}) left as it was", file=sys.stderr)
        return 3
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
    failed = [v.id for v in verdicts if not v.ok]
    print(f"\n{len(verdicts)} verdicts in {report['seconds']:.1f} s; report in {args.out}/report.md"
          + (f"; FAILED: {', '.join(failed)}" if failed else "; every check and sub-check holds"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
