"""Mutation self-test of ``python -m toy.verify_bounds``: each deliberate bug planted in the maths (monkeypatched)
must make the command exit 1 (a check or a sub-check failed), and the unmutated selection must exit 0."""

from __future__ import annotations

import pytest
import torch

import atdiff.perturb as perturb
import theory.linear as linear
from atdiff.processes import VPDiscrete
from theory.at_linear import l_at_1d
from theory.claims import c5_check, c6, load_all
from toy.verify_bounds import main

load_all()


def wrong_posterior_variance(monkeypatch):
    original = VPDiscrete.posterior

    def posterior(self, x_t, x0, t, s):
        mean, var = original(self, x_t, x0, t, s)
        return mean, var * 1.05

    monkeypatch.setattr(VPDiscrete, "posterior", posterior)


def l_at_without_the_quadratic_term(monkeypatch):
    def wrong(a, alpha, sigma, lam, eta, mean=0.0):
        return l_at_1d(a, alpha, sigma, lam, eta, mean) - eta**2 * (a - 1 / sigma) ** 2

    monkeypatch.setattr(c5_check, "l_at_1d", wrong)


def projection_that_does_nothing(monkeypatch):
    monkeypatch.setattr(perturb, "project_l2", lambda delta, radius: delta)


def heun_teacher_without_its_second_stage(monkeypatch):
    original = linear.ve_teacher_step
    monkeypatch.setattr(linear, "ve_teacher_step",
                        lambda model, process, x, t, s, method="heun": original(model, process, x, t, s, "euler"))


def free_at_fixed_point_with_the_clean_target(monkeypatch):
    original = c5_check.free_at_fixed_point
    monkeypatch.setattr(c5_check, "free_at_fixed_point", lambda *args, **kw: original(*args, **{**kw, "replay": 1}))


def ip_reference_at_the_nominal_noise(monkeypatch):
    monkeypatch.setattr(c6, "reference_slope", lambda alpha, sigma_ref, lam: sigma_ref / (alpha**2 * lam + 1.0))


MUTATIONS = {
    "C1": wrong_posterior_variance,
    "C3": wrong_posterior_variance,
    "C5": l_at_without_the_quadratic_term,
    "C8": projection_that_does_nothing,
    "C10": heun_teacher_without_its_second_stage,
    "C6": ip_reference_at_the_nominal_noise,
}


@pytest.mark.parametrize("cid", sorted(MUTATIONS))
def test_a_planted_bug_makes_verify_bounds_exit_one(cid, monkeypatch, tmp_path):
    MUTATIONS[cid](monkeypatch)
    assert main(["--quick", "--quiet", "--only", cid, "--out", str(tmp_path / "out")]) == 1


def test_a_sub_check_that_fails_makes_verify_bounds_exit_one(monkeypatch, tmp_path):
    # the free-AT fixed point computed without the delta passes no longer matches the real free_at_step run
    free_at_fixed_point_with_the_clean_target(monkeypatch)
    assert main(["--quick", "--quiet", "--only", "C5", "--out", str(tmp_path / "out")]) == 1


def test_the_unmutated_selection_exits_zero(tmp_path):
    assert main(["--quick", "--quiet", "--only", ",".join(sorted(MUTATIONS)), "--out", str(tmp_path / "out")]) == 0


def test_mutations_restore_cleanly():
    assert VPDiscrete.posterior.__name__ == "posterior" and perturb.project_l2(torch.ones(1, 4), torch.ones(1))[0, 0] \
        == pytest.approx(0.5)
