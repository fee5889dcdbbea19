"""The main command, ``python -m toy.verify_bounds``: report contents, exit codes, bad input."""

from __future__ import annotations

import json

import pytest

import theory.claims as claims_mod
from theory.claims import Verdict
from theory.estimators import reference_pair_errors
from toy.verify_bounds import main

FIELDS = {"id", "statement", "kind", "relation", "quantities", "holds", "margin", "notes", "figures", "seconds",
          "subchecks", "as_stated", "restatement"}
VERDICT_IDS = ["C1", "C2", "C3", "C4", "C5a", "C5b", "C6", "C7", "C8", "C9", "C10", "C11"]


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("vb")
    code = main(["--quick", "--quiet", "--out", str(out)])
    return code, out, json.loads((out / "report.json").read_text())


def test_quick_run_writes_a_parseable_report_with_all_eleven_claims(quick_report):
    code, out, report = quick_report
    assert [c["id"] for c in report["claims"]] == VERDICT_IDS
    for c in report["claims"]:
        assert FIELDS <= set(c), c["id"]
        assert c["kind"] in ("check", "measurement")
        assert c["quantities"], f"{c['id']} reports no numbers"
        assert c["figures"] == [], f"--quick draws no figures by default: {c['id']}"
    ok = [Verdict(**c).ok for c in report["claims"]]
    assert code == (0 if all(ok) else 1)
    assert all(ok), [c["id"] for c, good in zip(report["claims"], ok, strict=True) if not good]
    md = (out / "report.md").read_text()
    assert all(f"| {cid} |" in md for cid in VERDICT_IDS)
    assert not [p for p in out.parent.iterdir() if ".partial-" in p.name or ".old-" in p.name]
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


def test_a_failing_sub_check_of_a_measurement_makes_the_exit_code_one(monkeypatch, tmp_path):
    claims_mod.load_all()

    def bad_crosscheck(*, quick, seed, out):
        return Verdict("C7", "a measurement", "measurement", "<", {"x": 1.0}, True, 1.0,
                       subchecks={"monte_carlo_matches_closed_form": False})

    monkeypatch.setitem(claims_mod.CLAIMS, "C7", bad_crosscheck)
    assert main(["--only", "C7", "--quiet", "--out", str(tmp_path)]) == 1


def test_a_contrary_measurement_does_not_fail_the_run(monkeypatch, tmp_path):
    claims_mod.load_all()

    def contrary(*, quick, seed, out):
        return Verdict("C5", "AT lowers W2", "measurement", "<", {"w2": [1.0, 2.0]}, False, -1.0)

    monkeypatch.setitem(claims_mod.CLAIMS, "C5", contrary)
    assert main(["--only", "c5", "--quiet", "--out", str(tmp_path)]) == 0


def test_unknown_claim_id_lists_the_valid_ones(capsys, tmp_path):
    assert main(["--only", "C4,C99", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--only" in err and "C99" in err and "C1, C2" in err and "C11" in err


@pytest.mark.parametrize("seed", ["18446744073709551616", "-1", "2**64", "1.5"])
def test_a_bad_seed_is_a_usage_error(seed, capsys, tmp_path):
    assert main(["--seed", seed, "--out", str(tmp_path / "out")]) == 2
    assert "--seed" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_repeated_ids_run_once(tmp_path):
    assert main(["--only", "c4,,C4, c4", "--quick", "--quiet", "--out", str(tmp_path)]) == 0
    assert [c["id"] for c in json.loads((tmp_path / "report.json").read_text())["claims"]] == ["C4"]


def test_help_documents_the_exit_codes(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for line in ("0  every check", "1  a check or a sub-check failed", "2  bad usage", "3  the run crashed"):
        assert line in text


def test_a_crash_exits_three_and_leaves_the_previous_report(monkeypatch, tmp_path):
    out = tmp_path / "out"
    assert main(["--only", "C4", "--quick", "--quiet", "--out", str(out)]) == 0
    before = (out / "report.json").read_text()
    claims_mod.load_all()

    def crashes(*, quick, seed, out):
        raise RuntimeError("a bug in a claim")

    monkeypatch.setitem(claims_mod.CLAIMS, "C6", crashes)
    assert main(["--only", "C4,C6", "--quick", "--quiet", "--out", str(out)]) == 3
    assert (out / "report.json").read_text() == before  # the old run, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no partial folder left behind


def test_an_unwritable_out_exits_three(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["--only", "C4", "--quick", "--quiet", "--out", str(blocker / "out")]) == 3


def test_a_folder_with_other_files_is_refused(capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("my own file")
    assert main(["--only", "C4", "--quick", "--quiet", "--out", str(tmp_path)]) == 2
    assert "--out" in capsys.readouterr().err and (tmp_path / "notes.txt").read_text() == "my own file"


def test_a_new_run_replaces_the_whole_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.png").write_bytes(b"old figure")
    assert main(["--only", "C4", "--quick", "--quiet", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.md"]


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
