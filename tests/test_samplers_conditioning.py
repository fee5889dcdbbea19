"""Conditioning through every sampler: a class-conditional Gaussian oracle (class y has law N(m_y, S), so the
exact eps is sigma (alpha^2 S + sigma^2 I)^-1 (x - alpha m_y), written inline as an independent derivation),
a class-conditional UNet, and classifier-free guidance at scales 1 and 0."""

import pytest
import torch

from atdiff.networks import unet_small
from atdiff.precond import ClassifierFreeGuidance, DiffusionModel
from atdiff.processes import VPContinuous, VPDiscrete
from atdiff.samplers import (
    DIFFUSION_SAMPLERS,
    RespacedModel,
    ode_log_likelihood,
    respace,
    respaced_grid,
    sample,
    sample_ddpm,
    uniform_grid,
)

F64 = torch.float64
#: class means (rows 0..2) and the "null" label 3 of classifier-free guidance (an unconditional N(0, S))
MEANS = torch.tensor([[-3.0, 0.0], [0.0, 3.0], [3.0, 0.0], [0.0, 0.0]], dtype=F64)
COV = torch.tensor([[0.5, 0.2], [0.2, 0.3]], dtype=F64)
#: per-sampler options for the oracle runs (iddpm needs the variance output the oracle does not learn)
OPTS = {"iddpm": {"variance": "small"}, "iddpm-es": {"variance": "small"}, "ode": {"method": "rk4"}}

pytestmark = pytest.mark.usefixtures("one_thread")


def class_oracle(process):
    """The exact eps of class-conditional Gaussian data; ``y`` (B,) selects each row's class mean."""
    lam, U = torch.linalg.eigh(COV)

    def model(x, t, y):
        a, s = process.alpha(t).double()[:, None], process.sigma(t).double()[:, None]
        z = (x.double() - a * MEANS[y]) @ U
        return ((s * z / (a**2 * lam + s**2)) @ U.T).to(x.dtype)

    model.prediction = "eps"
    return model


def _labels(n):
    return torch.arange(n) % 3


@pytest.mark.parametrize("name", DIFFUSION_SAMPLERS)
def test_conditional_samples_equal_each_class_run_alone(name):
    """Rows of a mixed-label batch equal the rows of one run per class (the label reaches the model for every
    sample and every evaluation). pc's Langevin step averages norms over the batch, so its rows are coupled:
    there each class's run is compared through its law below."""
    process = VPDiscrete("linear")
    model = class_oracle(process)
    x_T = torch.randn(12, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    y = _labels(12)
    opts = OPTS.get(name, {})
    mixed = sample(name, model, x_T, process, 8, cond={"y": y}, generator=torch.Generator().manual_seed(1),
                   **opts)
    for c in range(3):
        alone = sample(name, model, x_T, process, 8, cond={"y": torch.full_like(y, c)},
                       generator=torch.Generator().manual_seed(1), **opts)
        assert alone.nfe == mixed.nfe
        rows = y == c
        if name != "pc":
            torch.testing.assert_close(mixed.x[rows], alone.x[rows], rtol=1e-12, atol=1e-12)
        else:
            assert (mixed.x[rows] - alone.x[rows]).abs().max() < 0.5  # same noise, coupled step sizes
        others = sample(name, model, x_T, process, 8, cond={"y": (y + 1) % 3},
                        generator=torch.Generator().manual_seed(1), **opts)
        assert (others.x - mixed.x).norm(dim=1).min() > 1.0  # a different label moves every sample


@pytest.mark.parametrize("name", DIFFUSION_SAMPLERS)
def test_each_class_samples_follow_its_law(name):
    """Per class, the sample mean is m_y (class means 3 apart) within 4 standard errors plus 0.03; the class
    covariances agree with one another within sampling error (the law differs between classes only by its
    mean) and with S within 0.13: at 50 evaluations (rk4 on 30 steps for the ODE, odd 49 for Heun) the
    stochastic samplers' discretisation biases the variance (DDPM's small variance on 50 uniform steps
    under-disperses by ~0.11), a class-independent bias that tests/test_samplers.py checks tightly at many
    steps."""
    process = VPContinuous()
    n = 3 * 1200
    gen = torch.Generator().manual_seed(5)
    x_T = torch.randn(n, 2, dtype=F64, generator=gen)
    y = _labels(n)
    opts = dict(OPTS.get(name, {}))
    if name == "ode":
        out = sample(name, class_oracle(process), x_T, process, 30, cond={"y": y}, generator=gen, **opts)
    else:
        out = sample(name, class_oracle(process), x_T, process, nfe=49 if name == "heun" else 50, cond={"y": y},
                     generator=gen, **opts)
    se_mean = (torch.diag(COV) / 1200).sqrt()
    # standard error of a covariance entry, sqrt((S_ij^2 + S_ii S_jj) / n); a difference of two: sqrt(2) times
    se_cov = ((COV**2 + torch.outer(torch.diag(COV), torch.diag(COV))) / 1200).sqrt()
    covs = []
    for c in range(3):
        xs = out.x[y == c]
        assert ((xs.mean(0) - MEANS[c]).abs() < 4 * se_mean + 0.03).all(), (name, c, xs.mean(0))
        covs.append(torch.cov(xs.T))
        assert ((covs[-1] - COV).abs() < 0.13).all(), (name, c, covs[-1])
    for a, b in ((0, 1), (1, 2), (0, 2)):
        assert ((covs[a] - covs[b]).abs() < 4 * 2**0.5 * se_cov).all(), (name, covs)


def _guidance_models(process):
    model = class_oracle(process)
    return model, ClassifierFreeGuidance(model, 1.0, {"y": 3}), ClassifierFreeGuidance(model, 0.0, {"y": 3})


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpm-solver", "heun", "sde"])
def test_guidance_scale_one_is_the_conditional_model_and_zero_the_unconditional(name):
    process = VPDiscrete("linear")
    model, scale_one, scale_zero = _guidance_models(process)
    x_T = torch.randn(9, 2, dtype=F64, generator=torch.Generator().manual_seed(2))
    y = _labels(9)

    def run(m, labels):
        return sample(name, m, x_T, process, 6, cond={"y": labels}, generator=torch.Generator().manual_seed(3)).x

    cond = run(model, y)
    assert torch.equal(run(scale_one, y), cond)
    assert torch.equal(run(scale_zero, y), run(model, torch.full_like(y, 3)))
    # a scale between the two is neither (the check can fail)
    half = run(ClassifierFreeGuidance(model, 0.5, {"y": 3}), y)
    assert (half - cond).abs().max() > 1e-3


def test_class_conditional_unet_samples_through_every_sampler():
    """``unet_small(num_classes=3)`` in a ``DiffusionModel``: every sampler in the dispatcher takes the labels,
    each row's result depends only on its own label (a mixed batch equals the per-class runs, up to float32
    rounding; pc's batch-coupled Langevin step excepted) and changing the labels changes the samples."""
    torch.manual_seed(0)
    process = VPDiscrete("linear")
    net = unet_small(in_channels=1, image_size=8, num_classes=3)
    for p in net.parameters():  # the output layer starts at zero; make the labels matter
        torch.nn.init.normal_(p, std=0.05)
    model = DiffusionModel(net, process).eval()
    x_T = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = _labels(6)
    with torch.no_grad():
        for name in DIFFUSION_SAMPLERS:
            opts = OPTS.get(name, {})
            steps = 1 if name == "ode" else 3
            mixed = sample(name, model, x_T, process, steps, cond={"y": y},
                           generator=torch.Generator().manual_seed(1), **opts)
            assert torch.isfinite(mixed.x).all(), name
            swapped = sample(name, model, x_T, process, steps, cond={"y": (y + 1) % 3},
                             generator=torch.Generator().manual_seed(1), **opts)
            assert (swapped.x - mixed.x).flatten(1).norm(dim=1).min() > 1e-3, name
            if name == "pc":
                continue
            for c in range(3):
                alone = sample(name, model, x_T, process, steps, cond={"y": torch.full_like(y, c)},
                               generator=torch.Generator().manual_seed(1), **opts)
                torch.testing.assert_close(mixed.x[y == c], alone.x[y == c], rtol=1e-4, atol=1e-4)


def test_unet_guidance_scale_one_and_zero_are_exact():
    """With a null class (label 3 of 4), guidance at scale 1 reproduces the conditional UNet's samples and at
    scale 0 the null-label ones through two samplers, up to float32 rounding: guidance runs one forward of 2B
    rows, whose convolution kernels block differently from a B-row forward (measured difference ~3e-5; the
    oracle test above is exact)."""
    torch.manual_seed(1)
    process = VPDiscrete("linear")
    net = unet_small(in_channels=1, image_size=8, num_classes=4)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    model = DiffusionModel(net, process).eval()
    x_T = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = _labels(4)
    with torch.no_grad():
        for name in ("ddim", "euler"):
            def run(m, labels, name=name):
                return sample(name, m, x_T, process, 3, cond={"y": labels}).x

            cond = run(model, y)
            uncond = run(model, torch.full_like(y, 3))
            one, zero = run(ClassifierFreeGuidance(model, 1.0, {"y": 3}), y), run(
                ClassifierFreeGuidance(model, 0.0, {"y": 3}), y)
            torch.testing.assert_close(one, cond, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(zero, uncond, rtol=1e-5, atol=1e-5)
            assert (cond - uncond).abs().max() > 1e-3


def test_respaced_model_and_log_likelihood_take_the_labels():
    """``RespacedModel`` hands ``cond`` to the wrapped model (the respaced process with the labels equals the
    respaced grid with the labels), and ``ode_log_likelihood`` of class-conditional data is each class's
    Gaussian log-density (up to the N(0, sigma_T^2) prior approximation, < 0.05 nats here)."""
    process = VPDiscrete("cosine")
    model = class_oracle(process)
    new, kept = respace(process, "ddim20")
    x_T = torch.randn(9, 2, dtype=F64, generator=torch.Generator().manual_seed(4))
    y = _labels(9)
    a = sample_ddpm(model, x_T, process, respaced_grid(process, "ddim20"), cond={"y": y},
                    generator=torch.Generator().manual_seed(1))
    b = sample_ddpm(RespacedModel(model, kept), x_T, new, uniform_grid(new, 20), cond={"y": y},
                    generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a.x, b.x, rtol=0, atol=1e-10)
    cont = VPContinuous()
    x = MEANS[y] + torch.randn(9, 2, dtype=F64, generator=torch.Generator().manual_seed(5)) @ torch.linalg.cholesky(
        COV).T
    res = ode_log_likelihood(class_oracle(cont), x, cont, cond={"y": y}, rtol=1e-7, atol=1e-7)
    exact = torch.distributions.MultivariateNormal(MEANS[y], COV).log_prob(x)
    assert (res.log_likelihood - exact).abs().max() < 0.05
    wrong = ode_log_likelihood(class_oracle(cont), x, cont, cond={"y": (y + 1) % 3}, rtol=1e-7, atol=1e-7)
    assert (wrong.log_likelihood - exact).abs().min() > 1.0


def test_sampler_wrappers_read_metadata_through_averaged_model():
    """``RespacedModel`` and ``EpsilonScaling`` read ``prediction`` / ``learned_variance`` through an
    ``AveragedModel`` (the EMA copy a training run samples from), and the ES of an x0-model divides the eps
    derived from it."""
    from torch.optim.swa_utils import AveragedModel

    from atdiff.networks.mlp import MLP
    from atdiff.samplers import EpsilonScaling

    process = VPDiscrete("linear")
    torch.manual_seed(0)
    base = DiffusionModel(MLP(2, hidden=8, depth=1), process, prediction="x0").double()
    ema = AveragedModel(base)
    _, kept = respace(process, "ddim10")
    wrapped = RespacedModel(ema, kept)
    assert (wrapped.prediction, wrapped.learned_variance) == ("x0", False)
    es = EpsilonScaling(ema, process, lam=2.0)
    assert (es.prediction, es.learned_variance) == ("eps", False)
    x, t = torch.randn(5, 2, dtype=F64), torch.full((5,), 300.0, dtype=F64)
    a, s = process.alpha(t)[:, None], process.sigma(t)[:, None]
    torch.testing.assert_close(es(x, t), (x - a * ema(x, t)) / s / 2.0)
    learned = DiffusionModel(MLP(2, hidden=8, depth=1), process, learned_variance=True)
    assert EpsilonScaling(AveragedModel(learned), process).learned_variance
