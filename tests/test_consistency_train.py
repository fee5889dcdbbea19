"""Consistency training that must work: CD from the exact denoiser drives a linear consistency function to the CD
fixed point (near the exact map) on 1-D and anisotropic Gaussian data; CT and CM-AT (free AT) on a 2-D mixture
beat the untrained model's one- and two-step samples."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from atdiff.consistency import ConsistencyLoss, Curriculum, chain_updates, cm_at_preset, heun_step, ict_loss
from atdiff.metrics import mode_statistics
from atdiff.networks import MLP
from atdiff.precond import ConsistencyModel, consistency_scalings
from atdiff.processes import VE
from atdiff.samplers.consistency import sample_consistency
from atdiff.train import EMA, free_at_step, train_step
from tests.test_consistency import DATA, SMAX, SMIN, exact_map, oracle_eps
from theory.gaussian import sample_data
from toy.mixtures import make_mixture
from toy.train_toy import w2

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64


class LinearCM(nn.Module):
    """A linear consistency function on N levels: f(x, sigma_i) = c_skip x + c_out (W_i c_in x + b_i)."""

    prediction = "x0"

    def __init__(self, levels: torch.Tensor, d: int, sigma_data: float = 0.5) -> None:
        super().__init__()
        self.register_buffer("levels", levels)
        self.W = nn.Parameter(torch.zeros(len(levels), d, d, dtype=F64))
        self.b = nn.Parameter(torch.zeros(len(levels), d, dtype=F64))
        self.sigma_data = sigma_data

    def forward(self, x, t):
        i = (t.to(F64).log()[:, None] - self.levels.log()[None]).abs().argmin(1)
        c_skip, c_out, c_in = consistency_scalings(t.to(F64), self.sigma_data, SMIN)
        inner = torch.einsum("bij,bj->bi", self.W[i], c_in[:, None] * x) + self.b[i]
        return c_skip[:, None] * x + c_out[:, None] * inner


def _affine(f, sigma: float, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, c) with f(x, sigma) = A x + c, read off an affine map."""
    t = torch.full((d + 1,), sigma, dtype=F64)
    pts = torch.cat([torch.zeros(1, d, dtype=F64), torch.eye(d, dtype=F64)])
    out = f(pts, t)
    return (out[1:] - out[0]).T, out[0]


def _bures_w2(m0, S0, m1, S1) -> float:
    def root(S):
        e, U = torch.linalg.eigh(S)
        return (U * e.clamp_min(0).sqrt()) @ U.T
    r1 = root(S1)
    cross = root(r1 @ S0 @ r1)
    return math.sqrt(max(float(((m0 - m1) ** 2).sum() + torch.trace(S0 + S1 - 2 * cross)), 0.0))


def _one_step_w2(f, m, S) -> float:
    """W2 between the one-step sample law f(sigma_max z) ~ N(c, sigma_max^2 A A^T) and the data N(m, S)."""
    A, c = _affine(f, SMAX, len(m))
    return _bures_w2(c, SMAX**2 * A @ A.T, m, S)


def _cd_fixed_point(m, S, N: int):
    """The CD fixed point at sigma_N: the composition of the teacher's Heun steps sigma_N -> ... -> sigma_1."""
    process = VE(SMIN, SMAX)
    sig = ConsistencyLoss(process, Curriculum("fixed", N=N)).sigmas()
    teacher = oracle_eps(m, S)

    def f(x, t):
        for j in range(N - 1, 0, -1):
            x = heun_step(teacher, x, sig[j].expand(len(x)), sig[j - 1].expand(len(x)), process)
        return x
    return f


@pytest.mark.parametrize("data", sorted(DATA))
def test_cd_from_the_oracle_drives_a_linear_consistency_function_to_the_fixed_point(data):
    """CD with the exact denoiser and a Heun teacher on N = 10 levels drives a linear consistency function to the CD
    fixed point (the composed teacher steps; it converges to the exact map as N grows, at the teacher's order 2)."""
    m, S = DATA[data]
    d, N = len(m), 10
    process = VE(SMIN, SMAX)
    loss = ConsistencyLoss(process, Curriculum("fixed", N=N, mu0=0.0), teacher=oracle_eps(m, S), solver="heun",
                           share_dropout=False)
    model = LinearCM(loss.sigmas(), d)
    with torch.no_grad():
        w2_untrained = _one_step_w2(model, m, S)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(0)
    root = torch.linalg.cholesky(S)
    for _ in range(600):
        train_step(model, m + torch.randn(64, d, generator=gen, dtype=F64) @ root.T, loss, opt, generator=gen)
    with torch.no_grad():
        A, c = _affine(model, SMAX, d)
        A_fp, c_fp = _affine(_cd_fixed_point(m, S, N), SMAX, d)
        A_ex, _ = _affine(exact_map(m, S), SMAX, d)
        w2_trained, w2_fp = _one_step_w2(model, m, S), _one_step_w2(_cd_fixed_point(m, S, N), m, S)
        w2_exact = _one_step_w2(exact_map(m, S), m, S)
        gaps = [float((_affine(_cd_fixed_point(m, S, n), SMAX, d)[0] - A_ex).abs().max()) for n in (20, 40, 80)]
    print(f"{data}: one-step W2 to the data: untrained {w2_untrained:.4f}, CD-trained {w2_trained:.4f}, CD fixed "
          f"point {w2_fp:.4f}, exact map {w2_exact:.4f}; fixed point - exact map at N = 20, 40, 80: {gaps}")
    assert float((A - A_fp).abs().max()) * SMAX < 1e-3 and float((c - c_fp).abs().max()) < 1e-3
    assert w2_trained < 0.2 * w2_untrained and abs(w2_trained - w2_fp) < 1e-3
    assert gaps[1] < 0.35 * gaps[0] and gaps[2] < 0.35 * gaps[1]  # second order in N: 1/4 per doubling


def _train_and_score(at: bool, steps: int = 600, n_eval: int = 600) -> dict[str, float]:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    mix = make_mixture("ring8")
    process = VE(SMIN, SMAX)
    model = ConsistencyModel(MLP(2, hidden=64, depth=2), sigma_data=1.4)
    untrained = ConsistencyModel(MLP(2, hidden=64, depth=2), sigma_data=1.4)
    untrained.load_state_dict(model.state_dict())
    preset = cm_at_preset("paper") if at else None
    opts = {} if preset is None else {"target_mode": preset["target_mode"]}
    loss = ict_loss(process, total_steps=steps, s0=10, s1=80, **opts)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    ema = EMA(model, decay=0.99, warmup=True)
    deltas = []
    for _ in range(steps if preset is None else steps // preset["replay"]):
        x0 = sample_data(mix, 256, gen).float()
        if preset is None:
            train_step(model, x0, loss, opt, ema=chain_updates(ema, loss), generator=gen)
        else:
            out = free_at_step(model, x0, loss, opt, replay=preset["replay"], perturber=preset["perturber"],
                               ema=chain_updates(ema, loss), generator=gen)
            deltas.append(out["delta_norm"])
    assert loss.curriculum.k == steps - (steps % 3 if at else 0)
    scores = {}
    for name, f in (("trained", ema.model), ("untrained", untrained)):
        for k, grid in (("1", [SMAX]), ("2", [SMAX, 0.8])):
            g = torch.Generator().manual_seed(1)
            with torch.no_grad():
                x = sample_consistency(f, SMAX * torch.randn(n_eval, 2, generator=g), process,
                                       torch.tensor(grid, dtype=F64), generator=g).x.double()
            scores[f"{name}_w2_{k}"] = w2(x, sample_data(mix, n_eval, g))
            scores[f"{name}_off_{k}"] = mode_statistics(x, mix.weights, mix.means, mix.covs)["off_mode_fraction"]
    if at:
        assert 0 < sum(deltas) / len(deltas) <= 0.1 * math.sqrt(2) * (1 + 1e-6)
    return scores


@pytest.mark.parametrize("at, steps", [(False, 600), pytest.param(True, 1200, marks=pytest.mark.slow)],
                         ids=["ct", "ct-at"])
def test_ct_on_a_mixture_beats_the_untrained_model(at, steps):
    """iCT (600 updates; with CM-AT: the paper preset through free_at_step, 400 minibatches of 3 passes; EMA 0.99)
    on ring8: one- and two-step W2 and off-mode fraction clearly below the untrained model's."""
    s = _train_and_score(at, steps)
    print({k: round(v, 4) for k, v in s.items()})
    for k in ("1", "2"):
        assert s[f"trained_w2_{k}"] < 0.6 * s[f"untrained_w2_{k}"]
        assert s[f"trained_off_{k}"] < s[f"untrained_off_{k}"] - 0.15
