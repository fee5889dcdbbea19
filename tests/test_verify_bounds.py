"""The main command, ``python -m toy.verify_bounds``: report contents, exit codes, bad input."""

from __future__ import annotations

import json

import pytest

import theory.claims as claims_mod
from theory.claims import CLAIM_IDS, Verdict
from theory.estimators import reference_pair_errors
from toy.verify_bounds import main

FIELDS = {"id", "statement", "kind", "relation", "quantities", "holds", "margin", "notes", "figures", "seconds"}


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("vb")
    code = main(["--quick", "--quiet", "--out", str(out)])
    return code, out, json.loads((out / "report.json").read_text())


def test_quick_run_writes_a_parseable_report_with_all_eleven_claims(quick_report):
    code, out, report = quick_report
    assert [c["id"] for c in report["claims"]] == list(CLAIM_IDS)
    for c in report["claims"]:
        assert FIELDS <= set(c), c["id"]
        assert c["kind"] in ("check", "measurement")
        assert c["quantities"], f"{c['id']} reports no numbers"
        assert c["figures"] == [], f"--quick draws no figures by default: {c['id']}"
    checks_hold = all(c["holds"] for c in report["claims"] if c["kind"] == "check")
    assert code == (0 if checks_hold else 1)
    assert checks_hold, [c["id"] for c in report["claims"] if c["kind"] == "check" and not c["holds"]]
    md = (out / "report.md").read_text()
    assert all(f"| {cid} |" in md for cid in CLAIM_IDS)
    assert not list(out.glob("*.png")) and "](estimators_vs_n.png)" not in md


def test_figures_flag_draws_and_links_the_figures(tmp_path):
    code = main(["--quick", "--quiet", "--figures", "--only", "C2,C5", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "report.json").read_text())
    md = (tmp_path / "report.md").read_text()
    assert code == 0 and all(c["figures"] for c in report["claims"])
    for c in report["claims"]:
        for fig in c["figures"]:
            name = fig.split("/")[-1]
            assert (tmp_path / name).stat().st_size > 1000 and f"]({name})" in md, fig


def test_estimator_figure_plots_the_reported_numbers(quick_report, tmp_path, monkeypatch):
    # every estimator of report.json appears in the figure with exactly its n, mean and sd
    from matplotlib.axes import Axes

    from toy.verify_bounds import plot_estimator_errors

    drawn, original = {}, Axes.errorbar

    def spy(self, x, y, *args, yerr=None, label=None, **kwargs):
        drawn[label] = (list(x), list(y), list(yerr))
        return original(self, x, y, *args, yerr=yerr, label=label, **kwargs)

    monkeypatch.setattr(Axes, "errorbar", spy)
    errors = quick_report[2]["estimators"]
    path = plot_estimator_errors(errors, tmp_path / "est.png")
    assert path.stat().st_size > 1000
    names = {"w2_exact", "w2_exact_floor", "w2_sliced", "kl_knn", "kl_monte_carlo"}
    assert set(drawn) == names
    for name in names:
        assert drawn[name] == (errors["n"]["n"], errors[name]["mean"], errors[name]["sd"]), name


def test_quick_report_carries_the_estimator_accuracy(quick_report):
    _, _, report = quick_report
    est = report["estimators"]
    assert est["truth"]["w2"][0] == pytest.approx(1.29099, abs=1e-5)  # the module docstring's reference values
    assert est["truth"]["sw2"][0] == pytest.approx(0.87062, abs=1e-5)
    assert est["truth"]["kl"][0] == pytest.approx(1.08843, abs=1e-5)
    floor = est["w2_exact_floor"]["mean"]
    assert all(a > b for a, b in zip(floor, floor[1:], strict=False)), f"W2 floor should shrink with n: {floor}"


def test_a_failing_check_makes_the_exit_code_one(monkeypatch, tmp_path):
    claims_mod.load_all()

    def broken(*, quick, seed, out):
        return Verdict("C4", "a deliberately broken identity", "check", "=", {"error": 1.0}, False, -1.0)

    monkeypatch.setitem(claims_mod.CLAIMS, "C4", broken)
    assert main(["--only", "C4", "--quiet", "--out", str(tmp_path)]) == 1
    report = json.loads((tmp_path / "report.json").read_text())
    assert [c["id"] for c in report["claims"]] == ["C4"] and "estimators" not in report


def test_a_contrary_measurement_does_not_fail_the_run(monkeypatch, tmp_path):
    claims_mod.load_all()

    def contrary(*, quick, seed, out):
        return Verdict("C5", "AT lowers W2", "measurement", "<", {"w2": [1.0, 2.0]}, False, -1.0)

    monkeypatch.setitem(claims_mod.CLAIMS, "C5", contrary)
    assert main(["--only", "c5", "--quiet", "--out", str(tmp_path)]) == 0


def test_unknown_claim_id_lists_the_valid_ones(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["--only", "C4,C99", "--out", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "C99" in err and "C1, C2" in err and "C11" in err


def test_reference_pair_errors_rejects_bad_input():
    with pytest.raises(ValueError, match="^ns[:,]"):
        reference_pair_errors((1, 100))
    with pytest.raises(ValueError, match="^seeds[:,]"):
        reference_pair_errors((100,), seeds=1)


def test_monte_carlo_kl_is_unbiased_and_knn_biased_low():
    est = reference_pair_errors((200, 800), seeds=6)
    mc, knn = est["kl_monte_carlo"], est["kl_knn"]
    for m, sd in zip(mc["mean"], mc["sd"], strict=True):  # unbiased: the mean error is within 4 standard errors
        assert abs(m) <= 4 * sd / 6**0.5
    assert max(knn["mean"]) < 0  # documented: biased low at these n
