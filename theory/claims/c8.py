"""C8 (check): with the reference hyperparameters (K = 3, l2 step 0.1, radius 0.1 sqrt(d), d = 3x32x32) the l2
projection of free AT never acts: ``||delta|| <= (K - 1) step = 0.2`` is far inside the radius of about 5.5. Counted
inside atdiff's own perturber and ``free_at_step`` *after* each projection (every output norm must equal
``min(||delta||, radius)``), and a radius below 0.2 must make it act on every update.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from atdiff.processes import VPDiscrete
from theory.claims import Verdict, claim
from theory.claims.common import (
    new_generator,
    single_thread,
)


def free_at_max_norm(replay: int, step: float) -> float:
    """The largest ``||delta||`` free AT can reach from 0 with ``replay`` passes: ``(replay - 1) * step``."""
    return (replay - 1) * step


def projection_can_fire(replay: int, step: float, radius: float) -> bool:
    """Whether the l2 projection can ever act: ``(replay - 1) * step > radius``."""
    return free_at_max_norm(replay, step) > radius


class ProjectionCounts(NamedTuple):
    """What the projection did: samples it moved (``fired``), samples whose output norm was not
    ``min(||delta||, radius)`` (``wrong``), projections made (``total``), largest norm before projecting."""

    fired: int
    wrong: int
    total: int
    max_pre_norm: float


def _counting_perturber(base):
    """A copy of the perturber ``base`` whose ``project`` records, per call, the samples it moved and the samples
    whose output norm is not ``min(||delta||, radius)`` (relative tolerance 1e-5)."""
    from atdiff.perturb import Perturber, per_sample_norm

    @dataclass(frozen=True)
    class CountingPerturber(Perturber):
        fired: list = field(default_factory=list, compare=False)
        wrong: list = field(default_factory=list, compare=False)
        norms: list = field(default_factory=list, compare=False)

        def project(self, delta: Tensor, radius: Tensor) -> Tensor:
            before = per_sample_norm(delta, self.norm)
            out = super().project(delta, radius)
            after = per_sample_norm(out, self.norm)
            expected = torch.minimum(before, radius)
            self.fired.append(int((after < before * (1 - 1e-6)).sum()))
            self.wrong.append(int(((after - expected).abs() > 1e-5 * expected.clamp_min(1e-12)).sum()))
            self.norms.append(float(before.max()))
            return out

    kwargs = {f.name: getattr(base, f.name) for f in fields(base) if f.init}
    return CountingPerturber(**kwargs)


def _counts(counting, batch: int) -> ProjectionCounts:
    return ProjectionCounts(sum(counting.fired), sum(counting.wrong), len(counting.fired) * batch,
                            max(counting.norms))


def count_projections(perturber, x0: Tensor, replay: int, trials: int, gen: torch.Generator,
                      aligned: bool = False) -> ProjectionCounts:
    """Run the free-AT delta updates (``replay - 1`` calls of ``perturber.ascend`` from 0) on random gradients.

    ``aligned=True`` uses the same gradient at every update (the worst case for the norm).
    """
    counting = _counting_perturber(perturber)
    t = torch.full((x0.shape[0],), 500.0, dtype=x0.dtype)
    radius = counting.radius_for(x0, t, VPDiscrete("linear"))
    for _ in range(trials):
        delta = torch.zeros_like(x0)
        g = torch.randn(x0.shape, generator=gen, dtype=x0.dtype)
        for _ in range(replay - 1):
            delta = counting.ascend(delta, g, radius)
            if not aligned:
                g = torch.randn(x0.shape, generator=gen, dtype=x0.dtype)
    return _counts(counting, x0.shape[0])


class _PixelNet(nn.Module):
    """A tiny eps-network for image-shaped inputs ``(B, C, H, W)``: two 1x1 convolutions, time ignored."""

    prediction = "eps"

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.a = nn.Conv2d(channels, 8, 1)
        self.b = nn.Conv2d(8, channels, 1)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.b(torch.tanh(self.a(x)))


def _free_at_projections(perturber, shape: tuple[int, ...], replay: int, batches: int, gen: torch.Generator
                         ) -> ProjectionCounts:
    """Count projections inside ``atdiff.train.free_at_step`` on random images with a tiny network."""
    from atdiff.losses import DenoisingLoss
    from atdiff.perturb import PAPER_TARGET_MODE
    from atdiff.train import free_at_step

    counting = _counting_perturber(perturber)
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    model = _PixelNet(shape[1])
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    loss = DenoisingLoss(VPDiscrete("cosine"), target_mode=PAPER_TARGET_MODE)
    for _ in range(batches):
        x0 = torch.randn(shape, generator=gen)
        free_at_step(model, x0, loss, opt, replay=replay, perturber=counting, generator=gen)
    return _counts(counting, shape[0])


@claim("C8")
@single_thread
def claim_c8(*, quick: bool, seed: int, out: Path | None) -> Verdict:
    """C8: with K = 3, step 0.1, radius 0.1 sqrt(d), d = 3*32*32 the projection never fires (bound and count in
    atdiff's perturber and free-AT step); with a radius below 0.2 it does."""
    from atdiff.perturb import paper_at, rms_radius

    gen = new_generator(seed)
    replay, d_shape = 3, (3, 32, 32)
    d = math.prod(d_shape)
    ref = paper_at()
    radius, step = float(rms_radius(ref.radius, d)), float(ref.step_size)
    batch, trials, batches = (8, 3, 1) if quick else (64, 20, 4)
    x0 = torch.zeros(batch, *d_shape)
    fired_rand = count_projections(ref, x0, replay, trials, gen)
    fired_aligned = count_projections(ref, x0, replay, trials, gen, aligned=True)
    fired_train = _free_at_projections(ref, (batch // 2 if quick else 8, *d_shape), replay, batches, gen)
    small = dataclasses.replace(ref, radius=0.001)
    small_radius = float(rms_radius(0.001, d))
    fired_small = count_projections(small, x0, replay, trials, gen)
    fired_small_train = _free_at_projections(small, (4, *d_shape), replay, 1, gen)
    reference = (fired_rand, fired_aligned, fired_train)
    everything = (*reference, fired_small, fired_small_train)
    bound_ok = not projection_can_fire(replay, step, radius)
    never = all(c.fired == 0 for c in reference)
    exact = all(c.wrong == 0 for c in everything)
    detects = projection_can_fire(replay, step, small_radius) and fired_small.fired == fired_small.total > 0 \
        and fired_small_train.fired > 0
    max_pre = max(c.max_pre_norm for c in reference)
    holds = bound_ok and never and exact and detects
    # margin from the counts: slack of the largest norm reached, or minus the share of bad projections
    bad = sum(c.fired for c in reference) + sum(c.wrong for c in everything) \
        + (0 if detects else fired_small.total - fired_small.fired + 1)
    margin = (radius - max_pre) / radius if holds else -bad / sum(c.total for c in everything)
    quantities = {
        "radius": radius, "max_norm_bound": free_at_max_norm(replay, step), "max_pre_projection_norm": max_pre,
        "fired_random_grads": f"{fired_rand.fired}/{fired_rand.total}",
        "fired_aligned_grads": f"{fired_aligned.fired}/{fired_aligned.total}",
        "fired_in_free_at_step": f"{fired_train.fired}/{fired_train.total}",
        "wrong_output_norms": f"{sum(c.wrong for c in everything)}/{sum(c.total for c in everything)}",
        "small_radius": small_radius,
        "small_radius_fired_random_grads": f"{fired_small.fired}/{fired_small.total}",
        "small_radius_fired_in_free_at_step": f"{fired_small_train.fired}/{fired_small_train.total}",
    }
    return Verdict(
        id="C8", kind="check", relation="||delta|| <= (K-1) step < radius",
        statement="With the reference hyperparameters (K = 3, step 0.1, radius 0.1 sqrt(3*32*32)) the l2 projection "
                  "never fires",
        quantities=quantities, holds=holds, margin=margin,
        notes="Counts, inside atdiff.perturb.Perturber.project (called by ascend, as free_at_step does), the samples "
              "the projection moved and the samples whose output norm differs from min(||delta||, radius); random "
              "and aligned (worst-case) gradients, and real free_at_step calls with a tiny 1x1-conv network on "
              f"random 3x32x32 images. Detection: rms radius 0.001 ({small_radius:.4f} < 0.2) must act on every "
              "update. Margin: (radius - largest norm reached) / radius when everything holds, else minus the share "
              "of offending projections.")
