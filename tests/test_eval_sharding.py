"""Sharded sampling gives the same images as one process with the same seed, and the NFE table/plot layout."""

import numpy as np
import pytest
import torch

from atdiff.eval.sharding import batch_generator, batch_plan, merge_shards
from atdiff.eval.sweep_table import nfe_table_markdown, plot_metric_vs_nfe


def stochastic_sampler(n: int, generator: torch.Generator) -> np.ndarray:
    """A stand-in sampler that draws initial noise and fresh noise at every step from its generator."""
    x = torch.randn(n, 2, 3, generator=generator)
    for _ in range(4):
        x = 0.9 * x + 0.1 * torch.randn(x.shape, generator=generator)
    return x.numpy()


def run(num_samples, batch_size, rank, world, seed=7):
    plan = batch_plan(num_samples, batch_size, rank, world)
    out = [stochastic_sampler(b.stop - b.start, batch_generator(seed, b.index)) for b in plan]
    return plan, (np.concatenate(out) if out else np.zeros((0, 2, 3), np.float32))


@pytest.mark.parametrize("world", [2, 3, 8])
def test_shards_reproduce_the_single_process_images(world):
    single = merge_shards([run(23, 4, 0, 1)])
    assert single.shape == (23, 2, 3)
    sharded = merge_shards([run(23, 4, r, world) for r in reversed(range(world))])  # any gather order
    np.testing.assert_array_equal(sharded, single)
    # batches are independent streams, and another seed changes the images
    assert not np.allclose(single[:4], single[4:8])
    assert not np.allclose(merge_shards([run(23, 4, 0, 1, seed=8)]), single)


def test_plan_covers_every_index_once_and_merge_checks_gaps():
    plans = [batch_plan(10, 3, r, 2) for r in range(2)]
    covered = sorted(i for plan in plans for b in plan for i in range(b.start, b.stop))
    assert covered == list(range(10))
    assert [b.index for b in plans[0]] == [0, 2] and [b.index for b in plans[1]] == [1, 3]
    with pytest.raises(ValueError, match=r"^shards: samples 3\.\.5 are missing"):
        merge_shards([run(10, 3, 0, 2)])
    with pytest.raises(ValueError, match=r"^rank: "):
        batch_plan(10, 3, 2, 2)


def test_nfe_table_and_plot_layout(tmp_path):
    results = {"ddim": {10: 12.5, 5: 30.25, 50: 4.0}, "dpm-solver++": {5: 20.0, 10: 8.125}}
    md = nfe_table_markdown(results, "digits FD", floor=2.5, command="python -m benchmarks.sweep ...")
    lines = md.splitlines()
    assert lines[0] == "| digits FD \\ NFE | 5 | 10 | 50 |"
    assert lines[2] == "| ddim | 30.25 | 12.5 | 4 |"
    assert lines[3] == "| dpm-solver++ | 20 | 8.125 | - |"
    assert "real-vs-real floor: 2.5" in md and "python -m benchmarks.sweep" in md
    fig = plot_metric_vs_nfe(results, tmp_path / "p.png", "digits FD", floor=2.5)
    ax = fig.axes[0]
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    np.testing.assert_array_equal(lines["ddim"].get_xdata(), [5, 10, 50])
    np.testing.assert_array_equal(lines["ddim"].get_ydata(), [30.25, 12.5, 4.0])
    np.testing.assert_array_equal(lines["real-vs-real floor"].get_ydata(), [2.5, 2.5])
    assert (tmp_path / "p.png").stat().st_size > 1000
