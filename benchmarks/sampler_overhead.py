"""Sampler overhead: wall time of each sampler divided by ``NFE x`` the time of one network forward.

A ratio of 1.00 means the sampler costs nothing beyond its network evaluations; the target is <= 1.05.
Measured in one process on the toy MLP (``atdiff.networks.mlp.MLP``) and a small UNet
(``atdiff.networks.unet.UNet``), at exactly 20 network evaluations (``sample(..., nfe=20)``; Heun 19, the
nearest odd budget; the adaptive ODE sampler on 20 steps),
in inference mode (``torch.no_grad()``, chosen by this caller). Each repeat times one sampler run and, right
after it, ``NFE`` back-to-back forwards of the same model on the same batch; ``ratio`` is the quotient of the
two fastest wall times over the repeats (the least disturbed runs). On a shared machine the load of other
processes still moves it by tens of percent, so two load-robust companions are reported: ``ratio_cpu``, the
same quotient of process CPU times, and ``ratio_null = 1 + overhead / forward`` with ``overhead_us`` measured
directly as the time per evaluation of the same sampler driving a null model (zeros of the right shape),
i.e. everything except the network.

    python -m benchmarks.sampler_overhead [--json PATH] [--quick] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from atdiff.networks.mlp import MLP
from atdiff.networks.unet import UNet
from atdiff.precond import DiffusionModel, declare
from atdiff.processes import VPDiscrete
from atdiff.samplers import REGISTRY, sample

#: network evaluations per sampler run (Heun spends 2N - 1: the nearest odd budget)
NFE_TARGET = 20
NFE = {"heun": NFE_TARGET - 1}


def make_models(quick: bool) -> list[tuple[str, Callable[[bool], nn.Module], tuple[int, ...]]]:
    """``(name, build(learned_variance) -> network, input shape)`` for the MLP and the image model."""

    def mlp(learned: bool) -> nn.Module:
        net = MLP(2, hidden=256, depth=3)
        if learned:
            net.out = nn.Linear(256, 4)
        return net

    mlp_batch = 1024 if quick else 4096
    models = [(f"mlp(2-D, batch {mlp_batch})", mlp, (mlp_batch, 2))]
    img_batch = 4 if quick else 16

    def unet(learned: bool) -> nn.Module:
        return UNet(3, 32, 3, 1, attention_resolutions=(8,), channel_mult=(1, 2), image_size=16,
                    learn_sigma=learned)

    models.append((f"unet(3x16x16, batch {img_batch})", unet, (img_batch, 3, 16, 16)))
    return models


def _elapsed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _elapsed_both(fn: Callable[[], object]) -> tuple[float, float]:
    """Wall and process-CPU seconds of ``fn()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def null_model(learned: bool) -> Callable:
    """A model that costs (almost) nothing: zeros of the prediction's shape (declared an eps-model)."""
    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x.shape[0], (2 if learned else 1) * x.shape[1], *x.shape[2:], dtype=x.dtype)

    return declare(model, "eps", learned_variance=learned)


def budget(name: str) -> dict:
    """The ``sample`` arguments that spend about ``NFE_TARGET`` evaluations: ``nfe=`` where the sampler's NFE can
    be set, else ``NFE_TARGET`` grid steps (the adaptive ODE sampler)."""
    if name == "ode":
        return {"steps_or_grid": NFE_TARGET}
    return {"nfe": NFE.get(name, NFE_TARGET)}


def measure_one(model: nn.Module, name: str, x_T: torch.Tensor, process: VPDiscrete, repeats: int,
                learned: bool) -> dict:
    """Timings of sampler ``name``, of its ``NFE`` forwards and of the sampler alone (module docstring)."""
    t_vec = torch.full((x_T.shape[0],), 500.0)

    def run(m: Callable = model):
        return sample(name, m, x_T, process, generator=torch.Generator().manual_seed(0), **budget(name))

    def forwards():
        for _ in range(nfe):
            model(x_T, t_vec)

    nfe = run().nfe  # also a warm-up
    pairs = [(_elapsed_both(run), _elapsed_both(forwards)) for _ in range(repeats)]
    null = null_model(learned)
    null_nfe = run(null).nfe
    alone = min(_elapsed(lambda: run(null)) for _ in range(3 * repeats))
    best_s, best_f = min(s[0] for s, _ in pairs), min(f[0] for _, f in pairs)
    cpu_s, cpu_f = min(s[1] for s, _ in pairs), min(f[1] for _, f in pairs)
    return {"sampler": name, "nfe": nfe, "sampler_ms": 1e3 * best_s,
            "forward_ms": 1e3 * best_f / nfe, "overhead_us": 1e6 * alone / null_nfe, "ratio": best_s / best_f,
            "ratio_median": statistics.median(s[0] / f[0] for s, f in pairs), "ratio_cpu": cpu_s / cpu_f,
            "ratio_null": 1 + (alone / null_nfe) / (best_f / nfe)}


def measure(quick: bool = False) -> list[dict]:
    """One row per (model, sampler): NFE, sampler ms, forward ms, overhead per NFE and the ratio."""
    torch.manual_seed(0)
    process = VPDiscrete("linear")
    repeats = 3 if quick else 9
    rows = []
    for model_name, build, shape in make_models(quick):
        for learned in (False, True):
            model = DiffusionModel(build(learned), process, learned_variance=learned).eval()
            for p in model.parameters():  # an untrained-but-nonzero network (the output layers start at 0)
                nn.init.normal_(p, std=0.02)
            x_T = torch.randn(shape)
            with torch.no_grad():
                for name in (n for n in REGISTRY if n.startswith("iddpm") == learned):
                    row = measure_one(model, name, x_T, process, repeats, learned)
                    rows.append({"model": model_name, **row})
                    print(_format_row(rows[-1]), flush=True)
    return rows


def _format_row(row: dict) -> str:
    return (f"{row['model']:<28} {row['sampler']:<13} {row['nfe']:>5} "
            f"{row['sampler_ms']:>11.1f} {row['forward_ms']:>10.2f} {row['overhead_us']:>12.0f} "
            f"{row['ratio']:>6.3f} {row['ratio_cpu']:>9.3f} {row['ratio_null']:>10.3f}")


def table(rows: list[dict]) -> str:
    """A readable table of :func:`measure`'s rows."""
    head = (f"{'model':<28} {'sampler':<13} {'nfe':>5} {'sampler_ms':>11} {'fwd_ms':>10} "
            f"{'overhead_us':>12} {'ratio':>6} {'ratio_cpu':>9} {'ratio_null':>10}")
    return "\n".join([head, "-" * len(head), *(_format_row(r) for r in rows)])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON to PATH")
    parser.add_argument("--quick", action="store_true",
                        help="smaller batches and fewer repeats (a smoke run)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's own choice)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rows = measure(quick=args.quick)
    print()
    print(table(rows))
    for key in ("ratio", "ratio_cpu", "ratio_null"):
        worst = max(rows, key=lambda r: r[key])
        print(f"worst {key} {worst[key]:.3f} ({worst['sampler']} on {worst['model']}); target <= 1.05")
    if args.json:
        with open(args.json, "w") as f:
            payload = {"nfe_target": NFE_TARGET, "threads": torch.get_num_threads(), "rows": rows}
            json.dump(payload, f, indent=2)


if __name__ == "__main__":
    main()
