"""benchmarks.robustness: trajectory perturbation against closed forms of a linear (Gaussian-oracle) sampler."""

from __future__ import annotations

import math

import pytest
import torch

from atdiff.networks import MLP
from atdiff.processes import VPDiscrete
from atdiff.samplers import default_grid, sample
from benchmarks.robustness import perturbed_final, trajectory_move
from theory.gaussian import Gaussian, oracle_model

VARS = torch.tensor([0.05, 0.3, 1.0, 2.5], dtype=torch.float64)


@pytest.fixture(scope="module")
def process():
    return VPDiscrete("cosine", T=1000)


@pytest.fixture(scope="module")
def oracle(process):
    return oracle_model(Gaussian(torch.zeros(4, dtype=torch.float64), torch.diag(VARS)), process)


def _ddim_tail_gain(process, grid, step: int, var: torch.Tensor) -> torch.Tensor:
    """Diagonal of the DDIM tail map of N(0, diag(var)) with the exact eps: per step ``x_s = g x_t`` with
    ``g = a_s / a_t + (s_s - a_s s_t / a_t) s_t / (a_t^2 v + s_t^2)``."""
    a, s = process.alpha(grid).double(), process.sigma(grid).double()
    gain = torch.ones_like(var)
    for i in range(step, len(grid) - 1):
        eps_gain = s[i] / (a[i] ** 2 * var + s[i] ** 2)
        gain = gain * (a[i + 1] / a[i] + (s[i + 1] - a[i + 1] * s[i] / a[i]) * eps_gain)
    return gain


def _ancestral_tail_gain(process, grid, step: int, var: torch.Tensor) -> torch.Tensor:
    """Diagonal of the linear part of the ancestral (DDPM posterior-mean) tail of N(0, diag(var)) with the exact
    x0 prediction ``x0 = a_t v x / (a_t^2 v + s_t^2)``: ``mu = a_s b / s_t^2 x0 + a_ts s_s^2 / s_t^2 x``,
    ``a_ts = a_t / a_s``, ``b = s_t^2 - a_ts^2 s_s^2``."""
    a, s = process.alpha(grid).double(), process.sigma(grid).double()
    gain = torch.ones_like(var)
    for i in range(step, len(grid) - 1):
        a_ts = a[i] / a[i + 1]
        b = s[i] ** 2 - a_ts**2 * s[i + 1] ** 2
        x0_gain = a[i] * var / (a[i] ** 2 * var + s[i] ** 2)
        gain = gain * (a[i + 1] * b / s[i] ** 2 * x0_gain + a_ts * s[i + 1] ** 2 / s[i] ** 2)
    return gain


def _x_T(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("step", [0, 5, 9])
def test_ddim_linear_tail_matches_singular_values(process, oracle, step):
    radius, n = 0.05, 3000
    gain = _ddim_tail_gain(process, default_grid("ddim", process, 10), step, VARS).abs()
    x_T = _x_T(n)
    c, p = perturbed_final(oracle, process, "ddim", 10, x_T, step=step, kind="random", radius=radius,
                           generator=torch.Generator().manual_seed(1))
    # random direction u on the sphere of radius r sqrt(d): E||A u||^2 / d = r^2 ||A||_F^2 / d
    assert trajectory_move(c, p) ** 2 == pytest.approx(radius**2 * (gain**2).sum().item() / 4, rel=0.05)
    c, p = perturbed_final(oracle, process, "ddim", 10, x_T[:200], step=step, kind="adversarial", radius=radius,
                           generator=torch.Generator().manual_seed(1))
    per_sample = (p - c).norm(dim=1) / (radius * 2.0)  # ||A delta|| / ||delta||, delta norm r sqrt(4)
    assert per_sample.max().item() <= gain.max().item() * (1 + 1e-6)
    # power iteration from a random start: a few starts nearly orthogonal to the top direction lag behind
    assert per_sample.quantile(0.9).item() >= gain.max().item() * 0.99
    assert trajectory_move(c, p) == pytest.approx(radius * gain.max().item(), rel=0.03)


def test_isotropic_gaussian_moves_by_the_scalar_gain(process):
    var = torch.full((3,), 0.7, dtype=torch.float64)
    model = oracle_model(Gaussian(torch.zeros(3, dtype=torch.float64), torch.diag(var)), process)
    gain = _ddim_tail_gain(process, default_grid("ddim", process, 8), 3, var)[0].abs().item()
    x_T = torch.randn(64, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for kind in ("random", "adversarial"):
        c, p = perturbed_final(model, process, "ddim", 8, x_T, step=3, kind=kind, radius=0.2,
                               generator=torch.Generator().manual_seed(0))
        norms = (p - c).norm(dim=1)
        torch.testing.assert_close(norms, torch.full_like(norms, gain * 0.2 * math.sqrt(3)), rtol=1e-6, atol=0)


def test_ancestral_noise_is_common_and_clean_equals_unsplit_run(process, oracle):
    """iddpm (fixed small variance) with the same generator: the clean final is the unsplit sampler's, and the noise
    cancels in the move, leaving the closed-form linear map of the posterior mean."""
    radius, n, step = 0.05, 3000, 4
    x_T = _x_T(n, 5)
    c, p = perturbed_final(oracle, process, "iddpm", 10, x_T, step=step, kind="random", radius=radius,
                           generator=torch.Generator().manual_seed(7), variance="small")
    unsplit = sample("iddpm", oracle, x_T, process, nfe=10, variance="small",
                     generator=torch.Generator().manual_seed(7)).x
    torch.testing.assert_close(c, unsplit, rtol=0, atol=0)
    gain = _ancestral_tail_gain(process, default_grid("iddpm", process, 10), step, VARS)
    assert trajectory_move(c, p) ** 2 == pytest.approx(radius**2 * (gain**2).sum().item() / 4, rel=0.05)


def _random_net_and_noise(sampler, *, seed, hidden, std, n, noise_seed):
    """A randomly initialised 2-D MLP (output layer scaled by ``std`` so it is far from zero), ``n`` starting
    noises, and the sampler options the MLP needs (it has no learned variance)."""
    torch.manual_seed(seed)
    net = MLP(2, hidden=hidden, depth=2)
    torch.nn.init.normal_(net.out.weight, std=std)
    x_T = torch.randn(n, 2, generator=torch.Generator().manual_seed(noise_seed))
    return net, x_T, ({"variance": "small"} if sampler == "iddpm" else {})


@pytest.mark.parametrize("sampler", ["ddim", "iddpm", "dpm-solver++"])
def test_zero_radius_gives_zero_move(process, sampler):
    net, x_T, opts = _random_net_and_noise(sampler, seed=0, hidden=16, std=0.3, n=32, noise_seed=0)
    for kind in ("random", "adversarial"):
        c, p = perturbed_final(net, process, sampler, 5, x_T, step=2, kind=kind, radius=0.0,
                               generator=torch.Generator().manual_seed(0), **opts)
        assert trajectory_move(c, p) == 0.0


@pytest.mark.parametrize("sampler", ["ddim", "iddpm", "dpm-solver++"])
def test_adversarial_moves_at_least_as_far_as_random(process, sampler):
    net, x_T, opts = _random_net_and_noise(sampler, seed=1, hidden=32, std=0.5, n=128, noise_seed=2)
    moves = {}
    for kind in ("random", "adversarial"):
        c, p = perturbed_final(net, process, sampler, 10, x_T, step=5, kind=kind, radius=0.1,
                               generator=torch.Generator().manual_seed(4), **opts)
        moves[kind] = (p - c).norm(dim=1)
    assert bool((moves["adversarial"] >= moves["random"] * (1 - 1e-5)).all())  # same start, best kept
    assert moves["adversarial"].pow(2).mean() > 1.2 * moves["random"].pow(2).mean()
    assert not any(p.requires_grad for p in net.parameters() if p.grad is not None)
    assert all(p.grad is None for p in net.parameters())


def test_deterministic_given_the_generator(process, oracle):
    x_T = _x_T(50)
    runs = [perturbed_final(oracle, process, "iddpm", 8, x_T, step=3, kind="adversarial", radius=0.1,
                            generator=torch.Generator().manual_seed(9), variance="small") for _ in range(2)]
    for a, b in zip(runs[0], runs[1], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"sampler": "nope"}, "sampler"),
    ({"sampler": "heun"}, "sampler"),
    ({"step": 10}, "step"),
    ({"step": -1}, "step"),
    ({"radius": -0.1}, "radius"),
    ({"radius": float("nan")}, "radius"),
    ({"kind": "gaussian"}, "kind"),
    ({"attack_steps": 0}, "attack_steps"),
    ({"nfe": 0}, "nfe"),
])
def test_bad_input_names_the_argument(process, oracle, kwargs, name):
    args = {"sampler": "ddim", "nfe": 10, "step": 5, "kind": "random", "radius": 0.1, **kwargs}
    with pytest.raises(ValueError, match=f"^{name}:"):
        perturbed_final(oracle, process, args.pop("sampler"), args.pop("nfe"), _x_T(4), **args)


def test_trajectory_move_closed_form():
    a = torch.zeros(3, 4)
    b = torch.tensor([[2.0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 4.0]])
    assert trajectory_move(a, b) == pytest.approx(math.sqrt((4 + 16) / 3 / 4))
    with pytest.raises(ValueError, match="^perturbed:"):
        trajectory_move(a, b[:2])
