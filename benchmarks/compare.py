"""The reproduction study (Wang et al. 2025's protocol): clean pretraining once, then fine-tuning with every method
from that checkpoint, sampled with the paper's four samplers at NFE 5-50, with paired statistics over seeds.

    python -m benchmarks.compare --suite digits --seeds 3 --threads 2          # about an hour on 2 CPU cores
    python -m benchmarks.compare --suite digits --quick                        # under 5 minutes
    python -m benchmarks.compare --suite toy --seeds 3                         # 2-D mixtures (benchmarks.compare_toy)
    python -m benchmarks.compare --suite cifar10 --device cuda --data-root data/cifar-10-batches-py \\
        --inception inception-2015-12-05.pt [--pretrained runs/cifar10-adm]   # full scale, GPU

Protocol of an image suite (stages cached under ``OUT/work``: rerunning the command resumes a killed run):

1. ``pretrain/``: the suite's clean recipe (``digits-std``, ...) trained once through :func:`benchmarks.train.train`
   (or ``--pretrained RUN_DIR``).
2. ``finetune/<method>-s<seed>/``: from the EMA weights of that checkpoint, each method trains for the same number of
   PARAMETER UPDATES ``U`` on the data stream and time/noise draws of ``train.seed = seed``: ``std`` (continued
   clean training), ``ip`` (input perturbation, gamma 0.1), ``at`` (free AT, K = 3 passes per minibatch, the l2 ball
   of per-pixel rms 0.1, the detached equivariant target), ``at-true-grad`` (the same with the full equivariant
   target) and ``at-kl`` (free AT in the KL ball of radius ``eta0``, :func:`atdiff.perturb.kl_ball_at`). Free AT
   makes K optimizer steps per minibatch (:func:`atdiff.train.free_at_step`), and ``benchmarks.train`` counts
   minibatches as steps: the AT runs take ``U / K`` steps (the first ``U / K`` minibatches of the same stream),
   std and ip take ``U`` steps; every run makes exactly ``U`` AdamW updates (checked from the optimizer state and
   written to ``finetune/*/compare_meta.json``). All use the AT recipe's optimizer settings.
3. Sampling: every fine-tuned EMA model with iddpm, iddpm-es, ddim and dpm-solver++ at the exact NFE (``nfe=N``),
   data-prediction clipping ``clip_x0 = 1`` (ADM's default), and the same initial and sampler noise for every
   method (``benchmarks.sample.generate``: sample i depends only on the seed and its batch).
4. Metrics: the suite's Frechet distance, KID, precision/recall (:func:`atdiff.eval.features.compute_metrics`), the
   real-vs-real floor at the same sample size, and ``var_bias`` (sample variance / data variance - 1, summed over
   coordinates). The iddpm-es column is the registered sampler (Ning et al.'s fixed lambda 1.017) for every method.
   Row ``std+es*``: the std model wrapped in epsilon scaling at the lambda that is best per (sampler, NFE) on the
   held-out seed, on top of the column's sampler (for iddpm-es the two scalings multiply).
5. Tuning on a held-out seed that is never reported: the ES lambda (grid near 1; Ning et al.'s 1.017 is a CIFAR-10
   value) and the KL radius ``eta0 = d rho^2 / 2`` over a grid of per-pixel rms ``rho`` (the KL ball at
   ``sigma_t = 1`` then has the paper's l2 radius ``rho sqrt(d)``), scored by the mean metric of the four samplers at
   the tuning NFE.
6. Robustness (:func:`benchmarks.robustness.perturbed_final`): DDIM at NFE 10, a perturbation of the state at the
   middle step of the grid, random and adversarial, at a few radii; the move of the final samples and their metric.

Output (default ``benchmarks/results/compare-<suite>[-quick]``): ``compare.md``, ``compare.json`` (per-stage
timings under ``timing``), ``metric_vs_nfe.png``, ``robustness.png``, ``grids/<method>.png``
(:mod:`benchmarks.compare_report`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from atdiff.distributed import DistInfo
from atdiff.eval.features import compute_metrics, make_extractor, metric_floor
from atdiff.eval.samples_io import save_grid, to_uint8
from atdiff.eval.sharding import batch_generator, batch_plan
from atdiff.perturb import PAPER_REPLAY
from atdiff.samplers import EpsilonScaling
from benchmarks.build import read_data
from benchmarks.cli import run_cli
from benchmarks.compare_finetune import (
    IMAGE_SUITES,
    ImageSuite,
    Sizes,
    checkpoint_payload,
    finetune,
    finetune_perturber,
    method_recipe,
)
from benchmarks.compare_report import ES_ROW, METHODS, SAMPLERS, SuiteResult, write_report
from benchmarks.recipes import Recipe, apply_overrides, check_recipe, get_recipe
from benchmarks.sample import clip_options, generate
from benchmarks.train import LATEST, grid_scale, load_run

__all__ = ["SUITES", "IMAGE_SUITES", "stage_plan", "check_plan", "var_bias", "run_image_suite", "machine_info", "main"]

SUITES = ("toy", "digits", "mnist5k", "cifar10", "imagenet64")
HELD_OUT_SEED = 1000
CLIP_X0 = 1.0


# ----------------------------------------------------------------------------------------------- the image suite


def var_bias(samples: np.ndarray, data: np.ndarray) -> float:
    """Sum over coordinates of the sample variance over samples, divided by the same for the data, minus 1 (any
    affine pixel scale cancels); ``samples`` ``(n, ...)``, ``data`` ``(m, ...)`` of the same geometry."""
    s, d = samples.reshape(len(samples), -1).astype(np.float64), data.reshape(len(data), -1).astype(np.float64)
    return float(s.var(0).sum() / d.var(0).sum() - 1.0)


def _crop(images: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Centre-crop NHWC ``images`` to the reference's (H, W) (MNIST-5k is trained padded to 32x32)."""
    h, w = shape[0], shape[1]
    top, left = (images.shape[1] - h) // 2, (images.shape[2] - w) // 2
    if top < 0 or left < 0:
        raise ValueError(f"ref: samples {images.shape[1:]} are smaller than the reference {shape}")
    return images[:, top:top + h, left:left + w]


@dataclass
class _Context:
    suite: ImageSuite
    sizes: Sizes
    out: Path
    work: Path
    device: torch.device
    progress: bool
    pretrained: Path
    extractor: object
    real_feats: np.ndarray
    ref_shape: tuple
    data_nhwc: np.ndarray
    timing: dict
    overrides: tuple[str, ...] = ()
    models: dict = dataclasses.field(default_factory=dict)
    counted: set = dataclasses.field(default_factory=set)

    def add_time(self, key: str, seconds: float, item: str | None = None) -> None:
        """Add the compute time of ``item`` (once, whether computed now or read from the cache) to stage ``key``."""
        if item is not None and item in self.counted:
            return
        self.counted.add(item)
        self.timing[key] = self.timing.get(key, 0.0) + float(seconds)

    def model(self, run_dir: Path):
        if run_dir not in self.models:
            self.models.clear()
            self.models[run_dir] = load_run(run_dir, map_location=self.device)
        return self.models[run_dir]


def _cell_samples(ctx: _Context, run_dir: Path, tag: str, sampler: str, nfe: int, seed: int, lam: float,
                  stage: str) -> tuple[np.ndarray, dict]:
    """Samples (uint8 NHWC) of the run with ``sampler`` at ``nfe``, the model wrapped in :class:`EpsilonScaling`
    with ``lam`` unless ``lam == 1`` (on top of the sampler: for iddpm-es the scalings multiply); cached."""
    path = ctx.work / "samples" / tag / f"{sampler}-nfe{nfe}-lam{lam:.4f}.npz"
    meta_path = path.with_suffix(".json")
    if path.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        ctx.add_time(stage, meta["seconds"], str(path))
        with np.load(path) as f:
            return f["images"], meta
    model, _, recipe = ctx.model(run_dir)
    wrapped = model if lam == 1.0 else EpsilonScaling(model, model.process, lam)
    classes = list(range(recipe.data.num_classes)) if recipe.data.class_cond else None
    start = time.perf_counter()
    images, _, spent = generate(wrapped, recipe, batch_plan(ctx.sizes.num_samples, ctx.sizes.batch),
                                sampler=sampler, nfe=nfe, steps=None, seed=seed, classes=classes, device=ctx.device,
                                progress=False, opts=clip_options(sampler, CLIP_X0))
    meta = {"nfe_measured": sorted(set(spent)), "seconds": time.perf_counter() - start,
            "clip_x0": clip_options(sampler, CLIP_X0).get("clip_x0")}
    ctx.add_time(stage, meta["seconds"], str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, images=images)
    meta_path.write_text(json.dumps(meta) + "\n")
    return images, meta


def _blas_one_thread():
    """One BLAS thread for the metrics' small matrix products: NumPy's multi-threaded BLAS on a busy 2-core machine
    made KID 25 times slower (measured); one thread also makes the numbers independent of the thread count."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - scikit-learn brings threadpoolctl
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def _cell_metrics(ctx: _Context, images: np.ndarray, seed: int) -> dict:
    feats, _ = ctx.extractor.outputs(_crop(images, ctx.ref_shape), False)
    with _blas_one_thread():
        m = compute_metrics(feats, ctx.real_feats, ["fid", "kid", "pr"], seed=seed)
    return {ctx.suite.metric: m["fid"], "kid": m["kid_mean"], "precision": m["precision"], "recall": m["recall"],
            "var_bias": var_bias(images, ctx.data_nhwc)}


def _evaluate(ctx: _Context, run_dir: Path, tag: str, sampler: str, nfe: int, seed: int, lam: float,
              stage: str) -> dict:
    images, meta = _cell_samples(ctx, run_dir, tag, sampler, nfe, seed, lam, stage)
    start = time.perf_counter()
    metrics = _cell_metrics(ctx, images, seed)
    ctx.add_time("metrics", time.perf_counter() - start)
    return {"nfe_measured": meta["nfe_measured"], **metrics}


def _finetune_run(ctx: _Context, method: str, seed: int, eta0: float | None = None) -> tuple[Path, dict]:
    tag = f"{method}-eta{eta0:g}-s{seed}" if method == "at-kl" else f"{method}-s{seed}"
    run_dir = ctx.work / "finetune" / tag
    recipe = method_recipe(ctx.suite, method, updates=ctx.sizes.updates, seed=seed, eta0=eta0,
                           checkpoint_every=ctx.sizes.checkpoint_every, extra=ctx.overrides)
    meta = finetune(recipe, run_dir, ctx.pretrained, finetune_perturber(method, eta0), ctx.device, ctx.progress)
    ctx.add_time("finetune", meta["seconds"], str(run_dir))
    return run_dir, meta


def _tune_es(ctx: _Context, std_dir: Path, tag: str, seed: int, bar) -> tuple[dict, dict]:
    """Best ES lambda per (sampler, NFE) on the held-out std run (ties: the lambda nearest 1)."""
    best, scores = {}, {}
    for s in SAMPLERS:
        for n in ctx.sizes.nfes:
            row = {}
            for lam in ctx.sizes.es_grid:
                row[lam] = _evaluate(ctx, std_dir, tag, s, n, seed, lam, "tune_es")[ctx.suite.metric]
                bar.update(1)
            scores.setdefault(s, {})[n] = row
            best.setdefault(s, {})[n] = min(ctx.sizes.es_grid, key=lambda lam, r=row: (r[lam], abs(lam - 1.0)))
    return best, scores


def _robustness(ctx: _Context, run_dir: Path, method: str, seed: int) -> list[dict]:
    """Perturbed DDIM trajectories of the run (cached per run): move and metric per (kind, radius)."""
    path = ctx.work / "robustness" / f"{method}-s{seed}.json"
    if path.is_file():
        cached = json.loads(path.read_text())
        ctx.add_time("robustness", cached["seconds"], str(path))
        return cached["records"]
    from benchmarks.robustness import perturbed_final

    z = ctx.sizes
    model, process, recipe = ctx.model(run_dir)
    d = recipe.data
    gen = batch_generator(seed, 0, ctx.device)
    x_T = torch.randn((z.robust_samples, d.channels, d.image_size, d.image_size), generator=gen, device=ctx.device)
    cond = {"y": torch.arange(z.robust_samples, device=ctx.device) % d.num_classes} if d.class_cond else None
    records, start = [], time.perf_counter()
    for k, kind in enumerate(("random", "adversarial")):
        for j, radius in enumerate(z.robust_radii):
            g = batch_generator(seed, 1 + k * len(z.robust_radii) + j, ctx.device)
            clean, pert = perturbed_final(model, process, "ddim", z.robust_nfe, x_T, step=z.robust_step, kind=kind,
                                          radius=radius, attack_steps=z.attack_steps, generator=g, cond=cond,
                                          clip_x0=CLIP_X0)
            diff = (pert.detach() - clean.detach()).flatten(1).double()
            move = float(torch.sqrt((diff.pow(2).sum(1) / diff.shape[1]).mean()))
            images = to_uint8(pert.detach().clamp(-1, 1))
            metric = _cell_metrics(ctx, images, seed)[ctx.suite.metric]
            records.append(dict(method=method, seed=seed, sampler="ddim", nfe=z.robust_nfe, step=z.robust_step,
                                kind=kind, radius=radius, move=move, **{ctx.suite.metric: metric}))
    seconds = time.perf_counter() - start
    ctx.add_time("robustness", seconds, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"records": records, "seconds": seconds}) + "\n")
    return records


# ----------------------------------------------------------------------------------------------- plan and run


def stage_plan(suite: ImageSuite, sizes: Sizes, n_seeds: int, pretrain_steps: int) -> list[dict]:
    """The stages with their counts and estimated seconds (from the suite's measured unit costs)."""
    u, spn, n = suite.sec_per_update, suite.sec_per_sample_nfe, sizes.num_samples
    sum_nfe, runs = sum(sizes.nfes), len(METHODS) * n_seeds
    adv = sizes.robust_nfe + sizes.attack_steps * 3 * (sizes.robust_nfe - sizes.robust_step)
    per_robust = len(sizes.robust_radii) * (2 * sizes.robust_nfe + adv) * sizes.robust_samples * spn
    return [
        dict(stage="pretrain", what=f"{suite.recipes[0]}, {pretrain_steps} steps", estimate_s=pretrain_steps * u),
        dict(stage="finetune", what=f"{runs + 1 + len(sizes.kl_rho)} runs x {sizes.updates} updates",
             estimate_s=(runs + 1 + len(sizes.kl_rho)) * sizes.updates * u),
        dict(stage="tune_es", what=f"4 samplers x {len(sizes.es_grid)} lambdas x NFE {list(sizes.nfes)}",
             estimate_s=4 * len(sizes.es_grid) * sum_nfe * n * spn),
        dict(stage="tune_kl", what=f"{len(sizes.kl_rho)} radii x 4 samplers at NFE {sizes.tune_nfe}",
             estimate_s=len(sizes.kl_rho) * 4 * sizes.tune_nfe * n * spn),
        dict(stage="sampling", what=f"{runs} models x 4 samplers x NFE {list(sizes.nfes)} x {n} samples (+ {ES_ROW})",
             estimate_s=(runs * 4 + n_seeds * 4) * sum_nfe * n * spn),
        dict(stage="robustness", what=f"{runs} models x 2 kinds x {len(sizes.robust_radii)} radii x "
             f"{sizes.robust_samples} samples", estimate_s=runs * per_robust),
    ]


def _check_inputs(suite: ImageSuite, data_root: str | None, inception: str | None, pretrained: str | None) -> None:
    """Everything a suite needs from disk, checked before any work (``ValueError`` naming the flag)."""
    if suite.needs_data_root:
        if not data_root or not Path(data_root).exists():
            raise ValueError(f"data-root: the {suite.name} suite needs its training data on disk "
                             f"({'not found: ' + data_root if data_root else 'none given'}); pass --data-root PATH")
    if suite.features == "inception" and (not inception or not Path(inception).is_file()):
        raise ValueError(f"inception: the {suite.name} suite's FID needs the Inception weights file "
                         f"({'not found: ' + inception if inception else 'none given'}); pass --inception PATH")
    if pretrained is not None and not (Path(pretrained) / LATEST).is_file():
        raise ValueError(f"pretrained: {pretrained} is not a run directory of benchmarks.train (no {LATEST})")


def _reference(suite: ImageSuite, recipe: Recipe, data_root: str | None) -> tuple[np.ndarray, np.ndarray]:
    """(reference images for the features, uint8 NHWC; training images for var_bias, uint8 NHWC)."""
    from atdiff.eval.features import load_reference_dataset

    train_images, _ = read_data(recipe)
    data = np.asarray(train_images[:50_000]).transpose(0, 2, 3, 1)
    if suite.name in ("digits", "mnist5k"):
        return load_reference_dataset(suite.name)[0], data
    if suite.name == "cifar10":
        return load_reference_dataset(f"cifar10:{data_root}")[0], data
    root = Path(data_root)
    files = sorted(root.glob("*.npz")) if root.is_dir() else [root]
    return load_reference_dataset(f"imagenet64:{files[0]}")[0], data


def _pretrain(recipe: Recipe, run_dir: Path, device: torch.device, progress: bool) -> float:
    """Train the clean recipe once (resuming a killed run); the seconds its training took."""
    from benchmarks.train import train

    meta = run_dir / "compare_meta.json"
    if meta.is_file():
        return float(json.loads(meta.read_text())["seconds"])
    resume = (run_dir / LATEST).is_file()
    train(recipe, run_dir, info=DistInfo(0, 1, 0, device), resume=resume, progress=progress)
    seconds = float(checkpoint_payload(run_dir)["elapsed"])
    meta.write_text(json.dumps({"recipe": recipe.name, "steps": recipe.train.steps, "seconds": seconds}) + "\n")
    return seconds


def check_plan(work: Path, plan: dict) -> None:
    """Record ``plan`` (JSON-able) in ``work / "plan.json"``, or check that it equals the recorded one (a rerun with
    the same settings resumes; other sizes in the same directory are refused with ``ValueError`` naming ``out``)."""
    plan = json.loads(json.dumps(plan))  # tuples become lists, as in the file
    path = work / "plan.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old != plan:
            diff = sorted(k for k in set(old) | set(plan) if old.get(k) != plan.get(k))
            raise ValueError(f"out: {work} holds a run with another plan (differs in {diff}); choose another --out "
                             f"or delete {work}")
    else:
        work.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(plan, indent=1) + "\n")


def run_image_suite(name: str, seeds: list[int], quick: bool, out: Path, *, device: torch.device,
                    progress: bool = True, data_root: str | None = None, inception: str | None = None,
                    pretrained: str | None = None, sizes: Sizes | None = None,
                    recipe_overrides: tuple[str, ...] = ()) -> SuiteResult:
    """The protocol of the module docstring for the image suite ``name``; stages cached under ``out / "work"``.
    ``sizes`` replaces the suite's (full or quick) sizes and ``recipe_overrides`` (``--set`` syntax) apply to every
    recipe: both for small tests."""
    from tqdm.auto import tqdm

    suite = IMAGE_SUITES[name]
    sizes = sizes or (suite.quick if quick else suite.full)
    _check_inputs(suite, data_root, inception, pretrained)
    overrides = ((f"data.root={data_root}",) if suite.needs_data_root else ()) + tuple(recipe_overrides)
    clean = apply_overrides(get_recipe(suite.recipes[0]), overrides)
    steps = sizes.pretrain_steps or clean.train.steps
    clean = check_recipe(apply_overrides(clean, [f"train.steps={steps}", "train.sample_every=0",
                                                 f"train.checkpoint_every={max(sizes.checkpoint_every, steps // 10)}",
                                                 f"train.log_every={max(1, steps // 20)}", "train.num_samples=16"]))
    work = out / "work"
    check_plan(work, {"suite": name, "sizes": dataclasses.asdict(sizes), "device": device.type,
                       "data_root": data_root, "pretrained": pretrained, "held_out_seed": HELD_OUT_SEED,
                       "overrides": list(overrides)})
    plan = stage_plan(suite, sizes, len(seeds), 0 if pretrained else steps)
    total = sum(p["estimate_s"] for p in plan)
    print(f"compare {name}{' --quick' if quick else ''}: seeds {seeds} (+ held-out {HELD_OUT_SEED}), {sizes.updates} "
          f"updates per fine-tuning run, {sizes.num_samples} samples per cell; stage plan (estimates at 2 threads "
          f"on an idle 2-core CPU):", flush=True)
    for p in plan:
        print(f"  {p['stage']:<11} {p['what']:<70} ~{p['estimate_s'] / 60:5.1f} min", flush=True)
    print(f"  total ~{total / 60:.0f} min; cached stages in {work} are reused", flush=True)

    wall = time.perf_counter()
    timing: dict[str, float] = {}
    pre_dir = Path(pretrained) if pretrained else work / "pretrain"
    if not pretrained:
        timing["pretrain"] = _pretrain(clean, pre_dir, device, progress)
    extractor = make_extractor(suite.features, inception, str(device))
    ref_images, data_nhwc = _reference(suite, clean, data_root)
    real_feats, _ = extractor.outputs(ref_images, False)
    ctx = _Context(suite, sizes, out, work, device, progress, pre_dir, extractor, real_feats, ref_images.shape[1:],
                   data_nhwc, timing, overrides)
    metric = suite.metric
    with _blas_one_thread():
        fl = metric_floor(real_feats, sizes.num_samples, ["fid", "kid", "pr"], seed=0)
        robust_floor = metric_floor(real_feats, sizes.robust_samples, ["fid"], seed=0)["fid"]
    floor = {metric: fl["fid"], "kid": fl["kid_mean"], "precision": fl["precision"], "recall": fl["recall"],
             f"{metric} (n={sizes.robust_samples}, robustness)": robust_floor}
    d = clean.data.channels * clean.data.image_size**2

    # held-out seed: the ES lambda on the std run, the KL radius on at-kl runs
    held = HELD_OUT_SEED
    finetune_records = []
    std_held, meta = _finetune_run(ctx, "std", held)
    finetune_records.append({"method": "std", "seed": held, **_public(meta)})
    n_es = len(SAMPLERS) * len(sizes.es_grid) * len(sizes.nfes)
    with tqdm(total=n_es, desc="tune ES lambda", disable=not progress) as bar:
        es_best, es_scores = _tune_es(ctx, std_held, f"std-s{held}", held, bar)
    kl_scores = {}
    for rho in sizes.kl_rho:
        eta0 = round(d * rho**2 / 2, 12)
        run_dir, meta = _finetune_run(ctx, "at-kl", held, eta0)
        finetune_records.append({"method": "at-kl", "seed": held, "eta0": eta0, **_public(meta)})
        vals = [_evaluate(ctx, run_dir, f"at-kl-eta{eta0:g}-s{held}", s, sizes.tune_nfe, held, 1.0, "tune_kl")[metric]
                for s in SAMPLERS]
        kl_scores[eta0] = float(np.mean(vals))
    eta_best = min(kl_scores, key=kl_scores.get)

    # reported seeds
    runs: dict[tuple[str, int], Path] = {}
    for seed in seeds:
        for method in METHODS:
            runs[(method, seed)], meta = _finetune_run(ctx, method, seed, eta_best if method == "at-kl" else None)
            finetune_records.append({"method": method, "seed": seed, **_public(meta)})
    cells = []
    todo = [(m, s, sp, n) for s in seeds for m in (*METHODS, ES_ROW) for sp in SAMPLERS for n in sizes.nfes]
    for method, seed, sampler, nfe in tqdm(todo, desc="sample + metrics", disable=not progress):
        if method == ES_ROW:
            run_dir, tag, lam = runs[("std", seed)], f"std-s{seed}", es_best[sampler][nfe]
        else:
            run_dir, tag, lam = runs[(method, seed)], f"{method}-s{seed}", 1.0
        cell = _evaluate(ctx, run_dir, tag, sampler, nfe, seed, lam, "sampling")
        cells.append({"method": method, "seed": seed, "sampler": sampler, "nfe": nfe, **cell})

    robustness, notes = [], []
    try:
        import benchmarks.robustness  # noqa: F401
    except ImportError as err:
        notes.append(f"robustness not run: benchmarks.robustness is not importable ({err})")
    else:
        for seed in seeds:
            for method in tqdm(METHODS, desc=f"robustness seed {seed}", disable=not progress):
                robustness += _robustness(ctx, runs[(method, seed)], method, seed)

    grids = _write_grids(ctx, seeds[0])
    timing["total_this_invocation"] = time.perf_counter() - wall
    timing["estimate_total"] = total
    clip = {s: clip_options(s, CLIP_X0).get("clip_x0") for s in SAMPLERS}
    tuning = {"held_out_seed": held, "es_lambda": es_best, "es_grid": list(sizes.es_grid), "es_scores": es_scores,
              "kl_radius": eta_best, "kl_scores": kl_scores, "kl_rho_grid": list(sizes.kl_rho),
              "kl_criterion": f"mean {metric} of the four samplers at NFE {sizes.tune_nfe}"}
    extra = {"sizes": {**dataclasses.asdict(sizes), "pretrain_steps": steps, "image_dim": d},
             "finetune": finetune_records, "clip_x0": clip, "notes": notes, "timing": timing,
             "protocol": {"updates": f"every fine-tuning run makes {sizes.updates} AdamW updates; free AT takes "
                                     f"{sizes.updates // PAPER_REPLAY} minibatches x K = {PAPER_REPLAY} passes",
                          "features": extractor.name, **{k: str(v) for k, v in extractor.info.items()
                                                         if k != "cache_dir"}}}
    return SuiteResult(suite=name, metric=metric, seeds=list(seeds), floor=floor, cells=cells, robustness=robustness,
                       tuning=tuning, extra=extra, grids=grids)


def _public(meta: dict) -> dict:
    """A fine-tuning meta without its timing and paths (those are not results)."""
    return {k: v for k, v in meta.items() if k not in ("seconds", "init_from")}


def _write_grids(ctx: _Context, seed: int) -> dict[str, str]:
    """One sample grid per method (DDIM at NFE 10, or the smallest NFE run, the first 64 samples of ``seed``)."""
    nfe = 10 if 10 in ctx.sizes.nfes else ctx.sizes.nfes[0]
    grids = {}
    for method in METHODS:
        path = ctx.work / "samples" / f"{method}-s{seed}" / f"ddim-nfe{nfe}-lam1.0000.npz"
        with np.load(path) as f:
            images = f["images"][:64]
        rel = f"grids/{method}.png"
        (ctx.out / "grids").mkdir(parents=True, exist_ok=True)
        save_grid(ctx.out / rel, images, pad=1, scale=grid_scale(images.shape[1]))
        grids[method] = rel
    return grids


# ----------------------------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", required=True, help=f"which study: {', '.join(SUITES)}")
    p.add_argument("--seeds", type=int, default=None,
                   help="number of reported seeds 1..N (default 3; 1 with --quick); a held-out tuning seed is added")
    p.add_argument("--quick", action="store_true",
                   help="small sizes (fewer updates and samples, NFE 5 and 10, one seed): a check in < 5 min on CPU")
    p.add_argument("--out", default=None, help="output directory (default benchmarks/results/compare-<suite>[-quick])")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (torch.set_num_threads; 0: torch's default)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="device for training and sampling")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--data-root", default=None, help="cifar10 / imagenet64: the training data (CIFAR-10 python "
                   "batches folder; ImageNet 64x64 .npz file or folder)")
    p.add_argument("--inception", default=None, help="cifar10 / imagenet64: local TorchScript Inception file for FID")
    p.add_argument("--pretrained", default=None,
                   help="image suites: a finished run directory of the clean recipe to fine-tune from (skips stage 1)")
    return p


def machine_info(device: torch.device) -> str:
    """CPU count, platform, torch version, threads and device, as one line."""
    return (f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, device {device}"
            + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))


def main(argv: list[str] | None = None) -> SuiteResult:
    args = _parser().parse_args(argv)
    if args.suite not in SUITES:
        raise ValueError(f"suite: unknown suite {args.suite!r}; expected one of {', '.join(SUITES)}")
    n_seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
    if n_seeds < 1:
        raise ValueError(f"seeds: expected >= 1, got {n_seeds}")
    if args.threads < 0:
        raise ValueError(f"threads: expected >= 0, got {args.threads}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: CUDA is not available on this machine; use --device cpu")
    if args.suite in IMAGE_SUITES:
        _check_inputs(IMAGE_SUITES[args.suite], args.data_root, args.inception, args.pretrained)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out or f"benchmarks/results/compare-{args.suite}{'-quick' if args.quick else ''}")
    seeds = list(range(1, n_seeds + 1))
    command = "python -m benchmarks.compare " + " ".join(shlex.quote(a) for a in (argv if argv is not None
                                                                                     else sys.argv[1:]))
    if args.suite == "toy":
        from benchmarks.compare_toy import run_toy_suite

        result = run_toy_suite(seeds, args.quick, out, not args.no_progress)
    else:
        result = run_image_suite(args.suite, seeds, args.quick, out, device=device, progress=not args.no_progress,
                                 data_root=args.data_root, inception=args.inception, pretrained=args.pretrained)
    write_report(result, out, command, machine_info(device))
    print(f"wrote {out / 'compare.md'} and {out / 'compare.json'}", flush=True)
    return result

if __name__ == "__main__":
    run_cli(main)
