"""The toy suite's regime map and consistency-model comparison (the tables of ``SuiteResult.extra``).

Regime map: where does AT help, and is it more than a variance correction? For each regime (MLP width,
converged or under-trained pretraining, AT radius) the std and AT models are fine-tuned from that regime's
pretrained weights on every reported seed, sampled with every sampler at each NFE of ``cfg.regime_nfes`` from
common noise, and compared by paired differences over the seeds: AT minus std and AT minus std+es* (the std
model with its epsilon-scaling lambda tuned on the held-out seed). A difference whose 95 % t-interval contains 0
is a tie. Each row also carries the final variance bias (sample variance / data variance - 1) of the three
models: if AT's gain over std vanishes against std+es*, AT acted as a variance (exposure-bias) correction.

Consistency models: CD and CT against CD-AT and CT-AT (:mod:`toy.consistency_toy`'s training and evaluation, the
same seeds and evaluation noise for every method), one- and two-step W2 and off-mode fraction, paired over seeds.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from atdiff.processes import VE, VPDiscrete
from atdiff.samplers import EpsilonScaling
from benchmarks.compare_report import paired_interval, verdict
from benchmarks.compare_toy import (
    ES_ROW,
    ToyConfig,
    _gen,
    cell,
    eval_set,
    finetune,
    method_recipe,
    pretrain,
    tune_es,
)
from theory.gaussian import GaussianMixture
from toy.mixtures import make_mixture

__all__ = ["regimes", "regime_map", "cm_comparison", "paired_row", "CM_METHODS"]

CM_METHODS = ("cd", "ct", "cd-at", "ct-at")


def regimes(cfg: ToyConfig) -> list[tuple[int, str, float]]:
    """``(width, pretraining, AT radius)`` of every regime: each width converged at the paper's radius, the
    suite's width under-trained, the suite's width at the other radii (duplicates removed, order kept)."""
    rows = [(w, "converged", cfg.at_radius) for w in cfg.regime_widths]
    rows.append((cfg.hidden, "under-trained", cfg.at_radius))
    rows += [(cfg.hidden, "converged", r) for r in cfg.regime_radii]
    return list(dict.fromkeys(rows))


def paired_row(prefix: str, diffs: list[float]) -> dict:
    """``{prefix: mean, prefix_lo, prefix_hi, prefix_verdict}`` of paired differences (t-interval over seeds)."""
    if not all(math.isfinite(d) for d in diffs):
        return {prefix: math.nan, f"{prefix}_lo": math.nan, f"{prefix}_hi": math.nan, f"{prefix}_verdict": "n/a"}
    mean, lo, hi = paired_interval(diffs)
    return {prefix: mean, f"{prefix}_lo": lo, f"{prefix}_hi": hi, f"{prefix}_verdict": verdict(lo, hi)}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def regime_map(mix: GaussianMixture, process: VPDiscrete, cfg: ToyConfig, seeds: list[int], *,
               pretrained: dict | None = None, models: dict | None = None, std_held: Callable | None = None
               ) -> list[dict]:
    """One row per (regime, sampler, NFE) (module docstring). ``pretrained`` ``{(width, "converged" |
    "under-trained"): state dict}``, ``models`` ``{(method, seed): model}`` (the main regime's std and at models)
    and ``std_held`` (its held-out std model) are reused instead of retrained."""
    pretrained = dict(pretrained or {})
    cache: dict[tuple, Callable] = {}
    for (method, seed), model in (models or {}).items():
        if method in ("std", "at"):
            radius = cfg.at_radius if method == "at" else None
            cache[method, cfg.hidden, "converged", radius, seed] = model
    if std_held is not None:
        cache["std", cfg.hidden, "converged", None, cfg.held_out_seed] = std_held
    evs = [eval_set(mix, s, cfg.regime_n_eval) for s in seeds]
    held = eval_set(mix, cfg.held_out_seed, cfg.regime_n_eval)
    steps_of = {"converged": cfg.pretrain_steps, "under-trained": cfg.under_steps}

    def model_of(method: str, width: int, length: str, radius: float | None, seed: int) -> Callable:
        key = (method, width, length, radius, seed)
        if key not in cache:
            if (width, length) not in pretrained:
                pretrained[width, length] = pretrain(mix, process, cfg, width, steps_of[length])
            recipe = method_recipe(method, at_radius=cfg.at_radius if radius is None else radius)
            cache[key] = finetune(pretrained[width, length], recipe, mix, process, cfg, width, seed)[0]
        return cache[key]

    rows = []
    for width, length, radius in regimes(cfg):
        lam, _ = tune_es(model_of("std", width, length, None, cfg.held_out_seed), process, mix, held, cfg,
                         cfg.samplers, cfg.regime_nfes)
        for sampler in cfg.samplers:
            for nfe in cfg.regime_nfes:
                per = {"std": [], "at": [], ES_ROW: []}
                for ev in evs:
                    std = model_of("std", width, length, None, ev.seed)
                    for name, model in (("std", std), ("at", model_of("at", width, length, radius, ev.seed)),
                                        (ES_ROW, EpsilonScaling(std, process, lam[sampler][nfe]))):
                        per[name].append(cell(name, model, process, mix, sampler, nfe, ev, cfg))
                w2 = {k: [c["w2"] for c in v] for k, v in per.items()}
                rows.append({
                    "width": width, "pretrain": length, "pretrain_steps": steps_of[length], "at_radius": radius,
                    "sampler": sampler, "nfe": nfe, "es_lambda": lam[sampler][nfe],
                    "std_w2": _mean(w2["std"]), "at_w2": _mean(w2["at"]), "std_es_w2": _mean(w2[ES_ROW]),
                    **paired_row("at_minus_std", [a - b for a, b in zip(w2["at"], w2["std"], strict=True)]),
                    **paired_row("at_minus_std_es", [a - b for a, b in zip(w2["at"], w2[ES_ROW], strict=True)]),
                    "var_bias_std": _mean([c["var_bias"] for c in per["std"]]),
                    "var_bias_at": _mean([c["var_bias"] for c in per["at"]]),
                    "var_bias_std_es": _mean([c["var_bias"] for c in per[ES_ROW]]),
                })
    return rows


def cm_comparison(cfg: ToyConfig, seeds: list[int]) -> tuple[list[dict], list[dict]]:
    """Train CD, CT, CD-AT and CT-AT on every seed (``cfg.cm_steps`` updates, width ``cfg.cm_hidden``) and
    evaluate them with the same noise; returns (per-run rows, paired rows ``X-at minus X`` per statistic)."""
    from toy.consistency_toy import evaluate as cm_evaluate
    from toy.consistency_toy import parse_args, train

    mix = make_mixture(cfg.mixture)
    process = VE(0.002, 80.0)
    runs = []
    for method in CM_METHODS:
        args = parse_args(["--method", method, "--steps", str(cfg.cm_steps), "--hidden", str(cfg.cm_hidden),
                           "--n-eval", str(cfg.cm_n_eval), "--mixture", cfg.mixture, "--quiet"])
        for seed in seeds:
            model, _, info = train(method, seed, args)
            stats = cm_evaluate(model, mix, process, args, _gen(seed, "cm-eval"))
            runs.append({"method": method, "seed": seed, **stats, "updates": info["updates"],
                         "skipped": info["skipped"]})
    table = []
    for base in ("cd", "ct"):
        for stat in ("w2_1", "w2_2", "off_mode_1", "off_mode_2"):
            plain = [r[stat] for r in runs if r["method"] == base]
            at = [r[stat] for r in runs if r["method"] == f"{base}-at"]
            table.append({"comparison": f"{base}-at minus {base}", "statistic": stat, "base_mean": _mean(plain),
                          "at_mean": _mean(at), **paired_row("diff", [a - b for a, b in zip(at, plain, strict=True)])})
    return runs, table
