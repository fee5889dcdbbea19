"""The toy suite of the reproduction study: fine-tuning methods x samplers x NFE on a 2-D Gaussian mixture.

Protocol (Wang et al. 2025 fine-tune a pretrained model with adversarial training; the same is done here on
``ring8``, 8 modes on a circle, :mod:`toy.mixtures`):

1. pretrain the toy MLP (:class:`atdiff.networks.MLP` in :class:`atdiff.precond.DiffusionModel`, VP cosine
   schedule, ``T = 1000``, clean :class:`atdiff.losses.DenoisingLoss`) once; its EMA weights are the shared start;
2. fine-tune a copy with every method for the same number of parameter updates on the seed's data stream:
   ``std`` (clean), ``ip`` (input perturbation, gamma 0.1), ``at`` (free AT, ``K = 3`` passes per minibatch, the
   paper's perturber and detached equivariant target, Algorithm 1), ``at-true-grad`` (the same with the full
   equivariant target), ``at-kl`` (free AT in the KL ball, its radius ``eta0`` tuned on a held-out seed);
3. sample every model with the four samplers at every NFE from the same noise (common random numbers) and score
   the samples against one reference draw of the mixture: exact W2 (POT), off-mode fraction, mode-occupancy TV and
   cross-entropy under the true density (:func:`toy.train_toy.evaluate`), beside the final variance bias;
   ``std+es*`` is the std model wrapped in epsilon scaling at the lambda tuned per sampler and NFE on the held-out
   seed (the ``iddpm-es`` sampler's own 1.017 stays in place, so its lambda multiplies it);
4. robustness: :func:`benchmarks.robustness.perturbed_final` (DDIM, mid-trajectory, random and adversarial);
5. the regime map (:mod:`benchmarks.compare_toy_regimes`): AT minus std and AT minus std+es* across width,
   pretraining length, NFE and AT radius, and the consistency-model comparison (CD / CT with and without CM-AT).

The MLP has no learned variance, so ``iddpm`` and ``iddpm-es`` run with the fixed ``small`` (posterior)
variance. Every sampler clamps its x0 prediction to the box ``[-3, 3]^2`` that holds the data (``clip_x0 = 3``,
the analogue of the image suites' ``[-1, 1]``): without it the cosine schedule's ``alpha_T ~ 4.5e-5`` amplifies the
network's error at ``t = T`` and IDDPM and DPM-Solver++ diverge at low NFE (measured on the pretrained width-128
model: DPM-Solver++ NFE 5 W2 270, IDDPM NFE 5 W2 4.2; clamped: 0.85 and 0.61). Samplers run with
``check_finite=False``; non-finite samples are counted in each cell (every statistic of such a cell is NaN).
The random and adversarial robustness rows of a radius start from the same direction, so the adversarial move is
never below the random one.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from atdiff.losses import DenoisingLoss
from atdiff.networks import MLP
from atdiff.perturb import Perturber, input_perturbation, kl_ball_at, paper_at
from atdiff.precond import DiffusionModel
from atdiff.processes import VPDiscrete
from atdiff.samplers import EpsilonScaling, sample
from atdiff.threads import one_thread
from atdiff.train import EMA, free_at_step, train_step
from benchmarks.compare_report import METHODS, NFES, SAMPLERS, SuiteResult
from benchmarks.robustness import perturbed_final, trajectory_move
from theory.gaussian import GaussianMixture, oracle_model, sample_data
from toy.mixtures import make_mixture, moment_matched_gaussian
from toy.train_toy import evaluate

__all__ = ["ToyConfig", "toy_config", "Recipe", "method_recipe", "pretrain", "finetune", "stream_seed",
           "run_toy_suite", "ES_ROW", "state_checksum"]

ES_ROW = "std+es*"
METRICS = ("w2", "off_mode_fraction", "mode_tv", "cross_entropy")


@dataclass(frozen=True)
class ToyConfig:
    """Sizes of the toy suite (see :func:`toy_config` for the full and quick settings)."""

    mixture: str = "ring8"
    hidden: int = 128
    depth: int = 3
    batch: int = 256
    pretrain_steps: int = 3000
    under_steps: int = 300
    pretrain_lr: float = 2e-3
    finetune_updates: int = 600
    finetune_lr: float = 5e-4
    ema: float = 0.995
    at_radius: float = 0.1
    ip_gamma: float = 0.1
    n_eval: int = 1500
    samplers: tuple[str, ...] = SAMPLERS
    nfes: tuple[int, ...] = NFES
    es_lambdas: tuple[float, ...] = (0.94, 0.96, 0.98, 1.0, 1.02, 1.04, 1.06)
    kl_eta0s: tuple[float, ...] = (0.001, 0.005, 0.02, 0.08)
    tune_nfe: int = 10
    robust_nfe: int = 10
    robust_radii: tuple[float, ...] = (0.05, 0.2)
    attack_steps: int = 5
    grid_nfe: int = 10
    regime_widths: tuple[int, ...] = (32, 128, 256)
    regime_radii: tuple[float, ...] = (0.05, 0.2)
    regime_nfes: tuple[int, ...] = (5, 20)
    regime_n_eval: int = 1000
    cm_steps: int = 801
    cm_hidden: int = 64
    cm_n_eval: int = 1000
    held_out_seed: int = 999
    pretrain_seed: int = 12345
    iddpm_variance: str = "small"
    clip_x0: float | None = 3.0

    def __post_init__(self) -> None:
        if self.finetune_updates % 3:
            raise ValueError(f"finetune_updates: free AT makes 3 updates per minibatch, so the budget must be a "
                             f"multiple of 3, got {self.finetune_updates}")
        if self.cm_steps % 3:
            raise ValueError(f"cm_steps: CM-AT makes 3 updates per minibatch, so the consistency runs' budget must be "
                             f"a multiple of 3 for CD/CT and CD-AT/CT-AT to make the same updates, got {self.cm_steps}")
        if 1.0 not in self.es_lambdas:
            raise ValueError(f"es_lambdas: must contain 1.0 (std itself), got {self.es_lambdas}")


def toy_config(quick: bool) -> ToyConfig:
    """The full suite's sizes, or ``quick`` ones (a smoke run of every part in about a minute)."""
    if not quick:
        return ToyConfig()
    return ToyConfig(hidden=64, batch=256, pretrain_steps=500, under_steps=60, finetune_updates=60, n_eval=500,
                     nfes=(5, 10), es_lambdas=(0.99, 1.0, 1.02), kl_eta0s=(0.005, 0.05), robust_radii=(0.1,),
                     attack_steps=3, regime_widths=(32,), regime_radii=(0.2,), regime_nfes=(10,),
                     regime_n_eval=400, cm_steps=60, cm_hidden=32, cm_n_eval=400)


def stream_seed(seed: int, tag: str) -> int:
    """A seed for the random stream ``tag`` of ``seed`` (stable across runs and machines)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{tag}".encode()).digest()[:8], "little") >> 2


def _gen(seed: int, tag: str) -> torch.Generator:
    return torch.Generator().manual_seed(stream_seed(seed, tag))


def state_checksum(model: nn.Module) -> float:
    """A float64 checksum of the parameters (equal start weights give equal checksums)."""
    return float(sum((p.detach().double() * (i + 1)).sum() for i, p in enumerate(model.parameters())))


# ------------------------------------------------------------------------------------------------ training
@dataclass(frozen=True)
class Recipe:
    """How a method fine-tunes: its perturber (None: clean), the loss's target mode, and ``replay`` (free AT's
    passes per minibatch, each one parameter update; 1: one :func:`atdiff.train.train_step` per minibatch)."""

    method: str
    perturber: Perturber | None
    target_mode: str
    replay: int


def _paper_at(radius: float) -> Perturber:
    """The paper's perturber (one l2 ascent step per pass of length ``radius`` in the RMS-``radius`` ball)."""
    return dataclasses.replace(paper_at(), radius=radius, step_size=radius)


def method_recipe(method: str, *, at_radius: float = 0.1, ip_gamma: float = 0.1, kl_eta0: float | None = None
                  ) -> Recipe:
    """The fine-tuning recipe of ``method`` (one of METHODS); ``at-kl`` needs ``kl_eta0``."""
    if method == "std":
        return Recipe(method, None, "invariant", 1)
    if method == "ip":
        return Recipe(method, input_perturbation(ip_gamma), "invariant", 1)
    if method == "at":
        return Recipe(method, _paper_at(at_radius), "equivariant-detached", 3)
    if method == "at-true-grad":
        return Recipe(method, _paper_at(at_radius), "equivariant", 3)
    if method == "at-kl":
        if kl_eta0 is None:
            raise ValueError("kl_eta0: at-kl needs the KL radius eta0")
        return Recipe(method, kl_ball_at(kl_eta0), "equivariant-detached", 3)
    raise ValueError(f"method: expected one of {METHODS}, got {method!r}")


def build_model(process: VPDiscrete, hidden: int, depth: int, seed: int) -> DiffusionModel:
    """A fresh toy model, its initial weights drawn from ``seed``."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return DiffusionModel(MLP(2, hidden=hidden, depth=depth), process)


def pretrain(mix: GaussianMixture, process: VPDiscrete, cfg: ToyConfig, hidden: int, steps: int) -> dict:
    """Clean pretraining (Adam, cosine-annealed learning rate); returns the EMA weights' state dict."""
    model = build_model(process, hidden, cfg.depth, stream_seed(cfg.pretrain_seed, f"init:{hidden}"))
    gen = _gen(cfg.pretrain_seed, f"pretrain:{hidden}")
    ema = EMA(model, decay=cfg.ema, warmup=True)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.pretrain_lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=cfg.pretrain_lr * 0.05)
    loss = DenoisingLoss(process)
    for _ in range(steps):
        train_step(model, sample_data(mix, cfg.batch, gen).float(), loss, opt, ema=ema, generator=gen)
        sched.step()
    return copy.deepcopy(ema.model.state_dict())


def finetune(start: dict, recipe: Recipe, mix: GaussianMixture, process: VPDiscrete, cfg: ToyConfig, hidden: int,
             seed: int) -> tuple[DiffusionModel, dict]:
    """Fine-tune a copy of the weights ``start`` (not modified) with ``recipe`` for ``cfg.finetune_updates``
    parameter updates on seed ``seed``'s data stream (the same stream for every method). Returns the EMA model and
    ``{"updates", "skipped", "minibatches", "start_checksum", "final_loss"}``."""
    model = build_model(process, hidden, cfg.depth, 0)
    model.load_state_dict(start)
    stats = {"start_checksum": state_checksum(model), "updates": 0, "skipped": 0, "minibatches": 0}
    loss = DenoisingLoss(process, target_mode=recipe.target_mode)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.finetune_lr)
    ema = EMA(model, decay=cfg.ema, warmup=True)
    gen = _gen(seed, "finetune")
    out = {"loss": math.nan}
    for _ in range(cfg.finetune_updates // recipe.replay):
        x0 = sample_data(mix, cfg.batch, gen).float()
        if recipe.replay == 1:
            out = train_step(model, x0, loss, opt, perturber=recipe.perturber, ema=ema, generator=gen)
            stats["updates"] += 1 - out["skipped"]
        else:
            out = free_at_step(model, x0, loss, opt, replay=recipe.replay, perturber=recipe.perturber, ema=ema,
                               generator=gen)
            stats["updates"] += out["updates"]
        stats["skipped"] += out["skipped"]
        stats["minibatches"] += 1
    stats["final_loss"] = float(out["loss"])
    return ema.model, stats


# ---------------------------------------------------------------------------------------------- evaluation
@dataclass
class EvalSet:
    """What every model of one seed is scored with: the initial noise, the reference data draw, the sampler
    noise seeds (common random numbers) and the mixture's per-coordinate variance."""

    seed: int
    x_T: torch.Tensor
    reference: torch.Tensor
    data_var: float


def eval_set(mix: GaussianMixture, seed: int, n: int) -> EvalSet:
    """The evaluation noise and reference of ``seed`` with ``n`` samples."""
    cov = moment_matched_gaussian(mix).cov
    return EvalSet(seed, torch.randn(n, 2, generator=_gen(seed, f"x_T:{n}")),
                   sample_data(mix, n, _gen(seed, f"reference:{n}")), float(cov.diagonal().mean()))


def sampler_opts(sampler: str, cfg: ToyConfig) -> dict:
    """The options of ``sampler`` for the toy model (fixed IDDPM variance: the MLP learns none)."""
    return {"variance": cfg.iddpm_variance} if sampler in ("iddpm", "iddpm-es") else {}


def draw(model: Callable, process: VPDiscrete, sampler: str, nfe: int, ev: EvalSet, cfg: ToyConfig
         ) -> tuple[torch.Tensor, int]:
    """Samples ``(n, 2)`` of ``model`` and the evaluations spent; the sampler noise is that of ``(seed, sampler,
    nfe)``, shared by every model."""
    gen = _gen(ev.seed, f"noise:{sampler}:{nfe}")
    with torch.no_grad():
        res = sample(sampler, model, ev.x_T, process, nfe=nfe, generator=gen, check_finite=False,
                     clip_x0=cfg.clip_x0, **sampler_opts(sampler, cfg))
    return res.x, res.nfe


def score(x: torch.Tensor, mix: GaussianMixture, process: VPDiscrete, ev: EvalSet) -> dict:
    """The toy statistics of samples ``x`` ``(n, 2)`` against the seed's reference, and the variance bias."""
    stats = evaluate(x.float(), mix, ev.reference, process)
    finite = torch.isfinite(x).all()
    stats["var_bias"] = float(x.double().var(0).mean() / ev.data_var - 1) if finite else math.nan
    return stats


def cell(method: str, model: Callable, process: VPDiscrete, mix: GaussianMixture, sampler: str, nfe: int,
         ev: EvalSet, cfg: ToyConfig) -> dict:
    """One result cell (the keys of ``SuiteResult.cells``)."""
    x, used = draw(model, process, sampler, nfe, ev, cfg)
    return {"method": method, "seed": ev.seed, "sampler": sampler, "nfe": nfe, "nfe_measured": used,
            **score(x, mix, process, ev)}


def tune_es(model: Callable, process: VPDiscrete, mix: GaussianMixture, ev: EvalSet, cfg: ToyConfig,
            samplers: tuple[str, ...], nfes: tuple[int, ...]) -> tuple[dict, list[dict]]:
    """Epsilon-scaling lambda per (sampler, NFE) minimising W2 of the std ``model`` on the held-out ``ev``
    (ties: the first in ``cfg.es_lambdas``). Returns ``({sampler: {nfe: lambda}}, search rows)``."""
    best: dict[str, dict[int, float]] = {}
    rows = []
    for sampler in samplers:
        best[sampler] = {}
        for nfe in nfes:
            scores = []
            for lam in cfg.es_lambdas:
                w = cell(ES_ROW, EpsilonScaling(model, process, lam), process, mix, sampler, nfe, ev, cfg)["w2"]
                scores.append(w)
                rows.append({"sampler": sampler, "nfe": nfe, "es_lambda": lam, "w2": w})
            finite = [(w, i) for i, w in enumerate(scores) if math.isfinite(w)]
            best[sampler][nfe] = cfg.es_lambdas[min(finite)[1]] if finite else 1.0
    return best, rows


def _scatter(x: torch.Tensor, reference: torch.Tensor, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 4))
    ax.scatter(reference[:, 0], reference[:, 1], s=2, c="0.75", label="data")
    ax.scatter(x[:, 0].float(), x[:, 1].float(), s=2, c="C0", label="samples")
    ax.set(xlim=(-3, 3), ylim=(-3, 3), aspect="equal", title=title)
    ax.legend(loc="upper right", markerscale=4, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def robustness_rows(method: str, model: Callable, process: VPDiscrete, mix: GaussianMixture, ev: EvalSet,
                    cfg: ToyConfig) -> list[dict]:
    """DDIM at ``cfg.robust_nfe``, perturbed at the middle grid index, random and adversarial, every radius."""
    step = cfg.robust_nfe // 2
    rows = []
    for kind in ("random", "adversarial"):
        for radius in cfg.robust_radii:
            clean, pert = perturbed_final(model, process, "ddim", cfg.robust_nfe, ev.x_T, step=step, kind=kind,
                                          radius=radius, attack_steps=cfg.attack_steps, clip_x0=cfg.clip_x0,
                                          generator=_gen(ev.seed, f"robust:{radius}"),
                                          **sampler_opts("ddim", cfg))
            rows.append({"method": method, "seed": ev.seed, "sampler": "ddim", "nfe": cfg.robust_nfe, "step": step,
                         "kind": kind, "radius": radius, "move": trajectory_move(clean, pert),
                         "w2": evaluate(pert.float(), mix, ev.reference, process)["w2"]})
    return rows


def floor_stats(mix: GaussianMixture, process: VPDiscrete, evs: list[EvalSet]) -> dict[str, float]:
    """The statistics of true samples (a second draw) against each seed's reference, averaged over seeds."""
    rows = [evaluate(sample_data(mix, len(ev.reference), _gen(ev.seed, "floor")).float(), mix, ev.reference,
                     process) for ev in evs]
    return {k: sum(r[k] for r in rows) / len(rows) for k in METRICS}


# --------------------------------------------------------------------------------------------------- suite
def run_toy_suite(seeds: list[int], quick: bool, out: Path, progress: bool, cfg: ToyConfig | None = None
                  ) -> SuiteResult:
    """Run the toy suite (module docstring) on the reported ``seeds`` and write the sample scatter plots into
    ``out``. ``cfg`` overrides the sizes of :func:`toy_config` (``quick`` then only names the run)."""
    from benchmarks.compare_toy_regimes import cm_comparison, regime_map

    cfg = cfg or toy_config(quick)
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds: expected distinct integers, got {seeds}")
    if cfg.held_out_seed in seeds:
        raise ValueError(f"seeds: {cfg.held_out_seed} is the held-out tuning seed and cannot be reported")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timing: dict[str, float] = {}
    clock = time.perf_counter()
    with one_thread():  # tiny networks: a second intra-op thread only adds hand-offs
        mix = make_mixture(cfg.mixture)
        process = VPDiscrete("cosine", T=1000)
        bar = tqdm(total=4 + len(seeds), desc="toy suite", disable=not progress)
        start = pretrain(mix, process, cfg, cfg.hidden, cfg.pretrain_steps)
        timing["pretrain_s"] = time.perf_counter() - clock
        bar.update()

        # held-out seed: epsilon-scaling lambdas of the std model, and the KL radius of at-kl
        held = eval_set(mix, cfg.held_out_seed, cfg.n_eval)
        recipe = method_recipe("std")
        std_held, _ = finetune(start, recipe, mix, process, cfg, cfg.hidden, cfg.held_out_seed)
        es_lambda, es_search = tune_es(std_held, process, mix, held, cfg, cfg.samplers, cfg.nfes)
        kl_search = []
        for eta0 in cfg.kl_eta0s:
            model, _ = finetune(start, method_recipe("at-kl", kl_eta0=eta0), mix, process, cfg, cfg.hidden,
                                cfg.held_out_seed)
            w = [cell("at-kl", model, process, mix, s, cfg.tune_nfe, held, cfg)["w2"] for s in cfg.samplers]
            kl_search.append({"eta0": eta0, "mean_w2": sum(w) / len(w)})
        finite = [r for r in kl_search if math.isfinite(r["mean_w2"])]
        kl_eta0 = min(finite, key=lambda r: r["mean_w2"])["eta0"] if finite else cfg.kl_eta0s[0]
        timing["tuning_s"] = time.perf_counter() - clock - timing["pretrain_s"]
        bar.update()

        cells, robust, train_stats, grids = [], [], [], {}
        evs = [eval_set(mix, s, cfg.n_eval) for s in seeds]
        models: dict[tuple[str, int], nn.Module] = {}
        for ev in evs:
            for method in METHODS:
                rec = method_recipe(method, at_radius=cfg.at_radius, ip_gamma=cfg.ip_gamma, kl_eta0=kl_eta0)
                model, stats = finetune(start, rec, mix, process, cfg, cfg.hidden, ev.seed)
                models[method, ev.seed] = model
                train_stats.append({"method": method, "seed": ev.seed, **stats})
                cells += [cell(method, model, process, mix, s, n, ev, cfg) for s in cfg.samplers for n in cfg.nfes]
                robust += robustness_rows(method, model, process, mix, ev, cfg)
                if ev is evs[0]:
                    x, _ = draw(model, process, "ddim", cfg.grid_nfe, ev, cfg)
                    grids[method] = f"toy_grid_{method}.png"
                    _scatter(x, ev.reference, f"{method}, DDIM NFE {cfg.grid_nfe}", out / grids[method])
            std = models["std", ev.seed]
            cells += [cell(ES_ROW, EpsilonScaling(std, process, es_lambda[s][n]), process, mix, s, n, ev, cfg)
                      for s in cfg.samplers for n in cfg.nfes]
            bar.update()
        timing["main_s"] = time.perf_counter() - clock - timing["pretrain_s"] - timing["tuning_s"]

        floor = floor_stats(mix, process, evs)
        references = reference_models(mix, process, cfg, evs[0])
        mark = time.perf_counter()
        regimes = regime_map(mix, process, cfg, seeds, pretrained={(cfg.hidden, "converged"): start},
                             models=models, std_held=std_held)
        timing["regime_map_s"] = time.perf_counter() - mark
        bar.update()
        mark = time.perf_counter()
        cm_rows, cm_table = cm_comparison(cfg, seeds)
        timing["cm_s"] = time.perf_counter() - mark
        bar.update()
        bar.close()
    timing["total_s"] = time.perf_counter() - clock
    extra = {
        "regime_map": regimes, "cm_comparison": cm_table, "cm_runs": cm_rows, "train_stats": train_stats,
        "reference_models": references, "config": {**dataclasses.asdict(cfg), "quick": quick},
        "sampler_options": {s: sampler_opts(s, cfg) for s in cfg.samplers},
        "non_finite_cells": [{k: c[k] for k in ("method", "seed", "sampler", "nfe", "non_finite")} for c in cells
                             if c["non_finite"]],
        "timing": timing,
    }
    tuning = {"es_lambda": es_lambda, "kl_radius": kl_eta0, "held_out_seed": cfg.held_out_seed,
              "es_search": es_search, "kl_search": kl_search, "criterion": "w2 on the held-out seed"}
    return SuiteResult(suite="toy", metric="w2", seeds=seeds, floor=floor, cells=cells, robustness=robust,
                       tuning=tuning, extra=extra, grids=grids)


def reference_models(mix: GaussianMixture, process: VPDiscrete, cfg: ToyConfig, ev: EvalSet) -> list[dict]:
    """The untrained network and the exact denoiser (oracle) with DDIM at ``cfg.grid_nfe`` on the first seed:
    the ends of the scale the fine-tuned models sit on."""
    untrained = build_model(process, cfg.hidden, cfg.depth, stream_seed(cfg.pretrain_seed, f"init:{cfg.hidden}"))
    rows = []
    for name, model in (("untrained", untrained), ("oracle", oracle_model(mix, process))):
        rows.append({"model": name, **cell(name, model, process, mix, "ddim", cfg.grid_nfe, ev, cfg)})
    return rows
