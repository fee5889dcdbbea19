"""The shared argument checks: anything finite and in range is accepted, anything else is a ValueError that names
the argument."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from atdiff.validate import check_choice, check_finite, check_int, check_real, check_same_shape


@given(value=st.floats(allow_nan=True, allow_infinity=True), lo=st.floats(-10, 10), width=st.floats(0, 10))
def test_check_real_accepts_exactly_the_finite_values_in_range(value, lo, width):
    hi = lo + width
    inside = math.isfinite(value) and lo <= value <= hi
    if inside:
        assert check_real(value, "gamma", lo, hi) == value
    else:
        with pytest.raises(ValueError, match="^gamma: "):
            check_real(value, "gamma", lo, hi)


@given(value=st.floats(0, 5))
def test_open_bounds_exclude_the_end_point(value):
    if value > 0:
        assert check_real(value, "step", 0.0, open_min=True) == value
    else:
        with pytest.raises(ValueError, match=r"^step: expected a number in \(0"):
            check_real(value, "step", 0.0, open_min=True)


@pytest.mark.parametrize("bad", [True, "1.0", None, [1.0], torch.tensor(1.0)])
def test_check_real_refuses_non_numbers(bad):
    with pytest.raises(ValueError, match="^rate: "):
        check_real(bad, "rate")


@given(value=st.integers(-10**6, 10**6), lo=st.integers(-100, 100))
def test_check_int_accepts_python_and_numpy_integers_in_range(value, lo):
    for v in (value, np.int64(value)):
        if value >= lo:
            assert check_int(v, "steps", lo) == value and type(check_int(v, "steps", lo)) is int
        else:
            with pytest.raises(ValueError, match="^steps: "):
                check_int(v, "steps", lo)


@pytest.mark.parametrize("bad", [2.0, 2.5, "10", True, None])
def test_check_int_refuses_non_integers(bad):
    with pytest.raises(ValueError, match="^steps: expected an integer"):
        check_int(bad, "steps", 1)


def test_choice_finite_and_shape():
    check_choice("l2", ("l2", "linf"), "norm")
    with pytest.raises(ValueError, match="^norm: expected one of"):
        check_choice("l1", ("l2", "linf"), "norm")
    with pytest.raises(ValueError, match="^flag: "):
        check_choice(True, (1, 0), "flag")  # True == 1, but a bool is not the integer choice
    check_finite(torch.ones(3), "x")
    check_finite(torch.ones(3, dtype=torch.long), "x")
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match="^x: contains NaN or infinite"):
            check_finite(torch.tensor([0.0, bad]), "x")
    with pytest.raises(TypeError, match="^x: expected a torch.Tensor"):
        check_finite([1.0], "x")
    with pytest.raises(ValueError, match="^delta: expected the shape of x0"):
        check_same_shape(torch.zeros(2, 3), torch.zeros(2, 4), "delta", "x0")
