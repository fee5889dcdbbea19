"""Checkpoint faults (issue 11, items 4-6): every test here fails on the previous ``atdiff.checkpoint``."""

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import atdiff.checkpoint as ck
from atdiff.checkpoint import load_checkpoint, read_config, save_checkpoint, seed_everything, sidecar_path
from atdiff.train import EMA


def _net(seed=0, width=4):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, width), torch.nn.Tanh(), torch.nn.Linear(width, 2))


def _trained_opt(net, steps=2):
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        net(torch.ones(5, 3)).square().sum().backward()
        opt.step()
    return opt


def _params(module):
    return [p.detach().clone() for p in module.state_dict().values()]


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _hidden_files(folder):
    return sorted(p.name for p in Path(folder).iterdir() if p.name.startswith("."))


# ------------------------------------------------------------------------------------------------- item 4: saving


def test_json_checkpoint_path_is_refused_and_config_never_overwrites_the_state(tmp_path):
    with pytest.raises(ValueError, match="^path: .*run.json.*suffix"):
        save_checkpoint(tmp_path / "run.json", config={"lr": 1}, model=_net())
    assert list(tmp_path.iterdir()) == []


def test_sidecar_is_named_by_the_full_file_name(tmp_path):
    save_checkpoint(tmp_path / "a.pt", config={"run": "pt"}, step=1)
    save_checkpoint(tmp_path / "a.pth", config={"run": "pth"}, step=2)
    assert sidecar_path(tmp_path / "a.pt").name == "a.pt.json"
    assert json.loads((tmp_path / "a.pt.json").read_text())["current"]["config"] == {"run": "pt"}
    assert json.loads((tmp_path / "a.pth.json").read_text())["current"]["config"] == {"run": "pth"}
    assert read_config(tmp_path / "a.pt") == {"run": "pt"} and read_config(tmp_path / "a.pth") == {"run": "pth"}
    assert load_checkpoint(tmp_path / "a.pt")["step"] == 1 and load_checkpoint(tmp_path / "a.pth")["step"] == 2


@pytest.mark.parametrize("bad, where", [
    (np.zeros(3), "extra"),
    (np.int64(3), "extra"),
    (np.float64(0.5), "extra"),
    ({"a": [1, np.int32(2)]}, r"extra\['a'\]\[1\]"),
    (object(), "extra"),
    (lambda: 0, "extra"),
])
def test_unloadable_state_is_refused_before_anything_is_written(tmp_path, bad, where):
    ckpt = tmp_path / "c.pt"
    save_checkpoint(ckpt, config={"v": 1}, step=1)
    before = ckpt.read_bytes(), sidecar_path(ckpt).read_bytes()
    with pytest.raises(ValueError, match=f"^{where}: "):
        save_checkpoint(ckpt, config={"v": 2}, model=_net(), step=2, extra=bad)
    assert (ckpt.read_bytes(), sidecar_path(ckpt).read_bytes()) == before
    assert _hidden_files(tmp_path) == []
    assert load_checkpoint(ckpt)["step"] == 1


def test_numpy_message_says_how_to_convert(tmp_path):
    with pytest.raises(ValueError, match=r"torch.from_numpy"):
        save_checkpoint(tmp_path / "c.pt", x=np.ones(2))
    with pytest.raises(ValueError, match="^config: "):
        save_checkpoint(tmp_path / "c.pt", config={"x": object()}, step=1)
    with pytest.raises(ValueError, match="^rng: .*reserved"):
        save_checkpoint(tmp_path / "c.pt", rng=1)
    assert list(tmp_path.iterdir()) == []


def test_generator_state_round_trips_and_resume_with_a_generator_is_exact(tmp_path):
    """A loop whose noise comes from an explicit torch.Generator: 3 + save + 3 steps == load + 3 steps."""
    def steps(net, opt, gen, n):
        for _ in range(n):
            opt.zero_grad()
            x = torch.randn(8, 3, generator=gen)
            (net(x) - torch.randn(8, 2, generator=gen)).square().mean().backward()
            opt.step()

    net, gen = _net(), torch.Generator().manual_seed(7)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    steps(net, opt, gen, 3)
    save_checkpoint(tmp_path / "c.pt", model=net, optimizer=opt, generator=gen, step=3)
    steps(net, opt, gen, 3)
    net2, gen2 = _net(seed=5), torch.Generator().manual_seed(123)
    opt2 = torch.optim.SGD(net2.parameters(), lr=0.1, momentum=0.9)
    payload = load_checkpoint(tmp_path / "c.pt", model=net2, optimizer=opt2, generator=gen2)
    steps(net2, opt2, gen2, 3)
    assert payload["step"] == 3 and payload["generator"].dtype == torch.uint8
    assert _same(_params(net), _params(net2))
    with pytest.raises(ValueError, match="^step: .*not a torch.Generator"):
        load_checkpoint(tmp_path / "c.pt", step=torch.Generator())
    with pytest.raises(ValueError, match="^generator: .*not a state_dict"):
        load_checkpoint(tmp_path / "c.pt", generator=_net())
    save_checkpoint(tmp_path / "d.pt", weights=net.state_dict())  # a state_dict saved as a plain value
    net3 = _net(seed=8)
    load_checkpoint(tmp_path / "d.pt", weights=net3)
    assert _same(_params(net), _params(net3))


def test_files_get_the_umask_mode(tmp_path):
    old = os.umask(0o022)
    try:
        save_checkpoint(tmp_path / "c.pt", config={}, step=1)
    finally:
        os.umask(old)
    for f in (tmp_path / "c.pt", tmp_path / "c.pt.json"):
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f


def _save_two(ckpt):
    first, second = _net(seed=1), _net(seed=2)
    save_checkpoint(ckpt, config={"n": 1}, model=first, step=1)
    return first, second


@pytest.mark.parametrize("fail_at", [1, 2])
def test_crash_between_or_before_the_renames_leaves_the_previous_pair_loadable(tmp_path, monkeypatch, fail_at):
    ckpt = tmp_path / "c.pt"
    first, second = _save_two(ckpt)
    real_replace, calls = os.replace, []

    def crashing_replace(src, dst):
        calls.append(dst)
        if len(calls) == fail_at:
            raise OSError("simulated crash")
        real_replace(src, dst)

    monkeypatch.setattr(ck.os, "replace", crashing_replace)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(ckpt, config={"n": 2}, model=second, step=2)
    monkeypatch.undo()
    assert Path(calls[0]).name == "c.pt.json"  # the sidecar is renamed first
    target = _net(seed=9)
    with pytest.warns(UserWarning, match="interrupted") if fail_at == 2 else _no_warning():
        payload = load_checkpoint(ckpt, model=target)
    assert payload["step"] == 1 and payload["config"] == {"n": 1} and read_config(ckpt) == {"n": 1}
    assert _same(_params(target), _params(first))
    # the next save recovers: the new pair is complete, no temporary file is left
    save_checkpoint(ckpt, config={"n": 3}, model=second, step=3)
    assert load_checkpoint(ckpt, model=target)["config"] == {"n": 3} and _same(_params(target), _params(second))
    assert _hidden_files(tmp_path) == []


class _no_warning:
    def __enter__(self):
        import warnings
        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.simplefilter("error")

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)


def test_crash_while_writing_the_state_leaves_the_previous_pair(tmp_path, monkeypatch):
    ckpt = tmp_path / "c.pt"
    first, second = _save_two(ckpt)

    def half_save(obj, f):
        f.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(ck.torch, "save", half_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(ckpt, config={"n": 2}, model=second, step=2)
    monkeypatch.undo()
    target = _net(seed=9)
    assert load_checkpoint(ckpt, model=target)["step"] == 1 and _same(_params(target), _params(first))
    assert _hidden_files(tmp_path) == []


def test_a_killed_save_leaves_temporaries_that_the_next_save_removes(tmp_path):
    """SIGKILL in the middle of torch.save (no cleanup code runs); the next save of that path cleans up,
    and leaves the temporaries of another checkpoint alone."""
    ckpt = tmp_path / "c.pt"
    script = textwrap.dedent(f"""
        import os, signal, torch
        import atdiff.checkpoint as ck
        real = torch.save
        def killed(obj, f):
            f.write(b"partial bytes")
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        ck.torch.save = killed
        ck.save_checkpoint({str(ckpt)!r}, step=2)
    """)
    save_checkpoint(ckpt, step=1)
    other = tmp_path / ".c.ptx.tmp-0123456789abcdef"
    other.write_bytes(b"another checkpoint's temporary")
    proc = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parents[1], capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()
    leftovers = [n for n in _hidden_files(tmp_path) if n != other.name]
    assert leftovers, "the killed save should have left a temporary file"
    assert load_checkpoint(ckpt)["step"] == 1
    save_checkpoint(ckpt, step=3)
    assert _hidden_files(tmp_path) == [other.name]
    assert load_checkpoint(ckpt)["step"] == 3


# ------------------------------------------------------------------------------------------------- item 5: loading


def test_missing_target_changes_nothing(tmp_path):
    save_checkpoint(tmp_path / "c.pt", model=_net(seed=1))
    target, opt = _net(seed=2), None
    opt = torch.optim.Adam(target.parameters())
    before = _params(target)
    with pytest.raises(ValueError, match="^optimizer: not in checkpoint"):
        load_checkpoint(tmp_path / "c.pt", model=target, optimizer=opt)
    assert _same(before, _params(target))


def test_mismatched_optimizer_changes_nothing(tmp_path):
    src = _net(seed=1)
    save_checkpoint(tmp_path / "c.pt", model=src, optimizer=_trained_opt(src))
    target = _net(seed=2)
    # one group over the first layer only: another number of parameters
    opt = torch.optim.Adam(target[0].parameters())
    before = _params(target)
    with pytest.raises(ValueError, match="^optimizer: parameter group 0 .* 4 parameters.* 2"):
        load_checkpoint(tmp_path / "c.pt", model=target, optimizer=opt)
    assert _same(before, _params(target)) and opt.state_dict()["state"] == {}


def test_model_of_another_shape_gets_no_entry(tmp_path):
    save_checkpoint(tmp_path / "c.pt", model=_net(seed=1, width=4))
    target = _net(seed=2, width=5)  # the last bias (2,) would fit, the rest does not
    before = _params(target)
    with pytest.raises(ValueError, match=r"^model: entry '0.weight' .* shape \(4, 3\)"):
        load_checkpoint(tmp_path / "c.pt", model=target)
    assert _same(before, _params(target))
    with pytest.raises(ValueError, match="^model: .*missing keys"):
        load_checkpoint(tmp_path / "c.pt", model=torch.nn.Linear(3, 2))


def test_failing_plain_target_is_rolled_back(tmp_path):
    save_checkpoint(tmp_path / "c.pt", ema=EMA(_net(seed=1), decay=0.5), ema_small=EMA(_net(seed=1), decay=0.5))
    ok, bad = EMA(_net(seed=2), decay=0.9), EMA(_net(seed=2, width=6), decay=0.9)
    before_ok, before_bad = _params(ok.model), _params(bad.model)
    with pytest.raises(ValueError, match="(?s)^ema_small: .*no target was changed"):
        load_checkpoint(tmp_path / "c.pt", ema=ok, ema_small=bad)
    assert _same(before_ok, _params(ok.model)) and ok.decay == 0.9
    assert _same(before_bad, _params(bad.model))


def _find_float_block(data: bytes, value: float, n: int) -> int:
    block = np.full(n, value, dtype="<f4").tobytes()
    at = data.find(block)
    assert at >= 0
    return at


def test_corrupted_tensor_bytes_are_refused(tmp_path):
    net = torch.nn.Linear(64, 1)
    with torch.no_grad():
        net.weight.fill_(1.25)
    ckpt = tmp_path / "c.pt"
    save_checkpoint(ckpt, model=net)
    data = bytearray(ckpt.read_bytes())
    at = _find_float_block(bytes(data), 1.25, 64)
    data[at:at + 4] = np.array([7.5], dtype="<f4").tobytes()  # a valid float, same length: torch loads it
    ckpt.write_bytes(bytes(data))
    target = torch.nn.Linear(64, 1)
    before = _params(target)
    with pytest.raises(ValueError, match=f"^path: {ckpt}.*sha256"):
        load_checkpoint(ckpt, model=target)
    assert _same(before, _params(target))


def test_truncated_or_foreign_files_are_refused_naming_the_file(tmp_path):
    ckpt = tmp_path / "c.pt"
    save_checkpoint(ckpt, model=_net())
    ckpt.write_bytes(ckpt.read_bytes()[:200])
    with pytest.raises(ValueError, match=f"^path: {ckpt}"):
        load_checkpoint(ckpt)
    foreign = tmp_path / "f.pt"
    torch.save({"model": _net().state_dict()}, foreign)
    with pytest.raises(ValueError, match=f"^path: {foreign} has no sidecar"):
        load_checkpoint(foreign)
    sidecar_path(foreign).write_text("{not json")
    with pytest.raises(ValueError, match="^path: .*f.pt.json is not readable JSON"):
        load_checkpoint(foreign)
    with pytest.raises(FileNotFoundError, match="^path: "):
        load_checkpoint(tmp_path / "none.pt")


def test_full_round_trip_restores_every_kind_of_entry(tmp_path):
    seed_everything(3)
    net = _net()
    opt = _trained_opt(net)
    ema = EMA(net, decay=0.99)
    ema.update(net)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    save_checkpoint(tmp_path / "c.pt", config={"a": [1, 2]}, model=net, optimizer=opt, ema=ema, scaler=scaler,
                    step=11, history=[1.5, None, "x"], t=torch.arange(3))
    expected_draw = torch.rand(3)
    net2 = _net(seed=4)
    opt2 = torch.optim.Adam(net2.parameters(), lr=1e-2)
    ema2, scaler2 = EMA(net2, decay=0.5), torch.amp.GradScaler("cpu")
    payload = load_checkpoint(tmp_path / "c.pt", model=net2, optimizer=opt2, ema=ema2, scaler=scaler2)
    torch.testing.assert_close(torch.rand(3), expected_draw, rtol=0, atol=0)  # global RNG restored
    assert _same(_params(net), _params(net2)) and _same(_params(ema.model), _params(ema2.model))
    assert ema2.decay == 0.99 and ema2.num_updates == 1 and scaler2.get_scale() == 8.0
    assert opt2.state_dict()["state"][0]["step"] == 2
    assert payload["history"] == [1.5, None, "x"] and payload["t"].tolist() == [0, 1, 2]
    assert payload["config"] == {"a": [1, 2]}


def test_rng_states_of_several_ranks_can_be_stored(tmp_path):
    import random

    seed_everything(1)
    states = [ck.rng_state()]
    expected = (random.random(), float(np.random.rand()), torch.rand(1).item())
    seed_everything(2)
    states.append(ck.rng_state())
    save_checkpoint(tmp_path / "c.pt", rank_rng=states)
    payload = load_checkpoint(tmp_path / "c.pt", restore_rng=False)
    ck.set_rng_state(payload["rank_rng"][0])
    assert (random.random(), float(np.random.rand()), torch.rand(1).item()) == expected


def test_two_interrupted_saves_in_a_row_still_leave_the_first_pair(tmp_path, monkeypatch):
    ckpt = tmp_path / "c.pt"
    first, second = _save_two(ckpt)
    real_replace = os.replace

    def sidecar_only(src, dst):  # every save dies right after its sidecar rename
        if Path(dst).name == "c.pt":
            raise OSError("simulated crash")
        real_replace(src, dst)

    monkeypatch.setattr(ck.os, "replace", sidecar_only)
    for n in (2, 3):
        with pytest.raises(OSError):
            save_checkpoint(ckpt, config={"n": n}, model=second, step=n)
    monkeypatch.undo()
    target = _net(seed=9)
    with pytest.warns(UserWarning, match="interrupted"):
        assert load_checkpoint(ckpt, model=target)["config"] == {"n": 1}
    assert _same(_params(target), _params(first))
