"""The comparison every kernel test goes through (tests/tolerances.py) refuses what it must: were it to
pass anything, every kernel test would pass with it."""
import pytest
import torch

from tests.tolerances import assert_close


def _sum_of_products(dtype):
    """Row sums of products, in float64 and computed in `dtype` (the PyTorch reference's rounding)."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 64, 200, generator=gen, dtype=torch.float64)
    return (a * b).sum(-1), (a.to(dtype) * b.to(dtype)).sum(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_result_as_accurate_as_the_reference_passes(dtype):
    expected, same_dtype = _sum_of_products(dtype)
    assert_close("sum", same_dtype, expected, same_dtype, reduced_over=200)
    assert_close("sum", expected.to(dtype), expected, same_dtype, reduced_over=200)  # rounded once: better


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("error", ["1% of one element", "1/64 of the largest, everywhere", "sign of one element"])
def test_a_wrong_result_fails(dtype, error):
    expected, same_dtype = _sum_of_products(dtype)
    wrong = expected.clone()
    if error == "1% of one element":
        wrong[expected.abs().argmax()] *= 1.01
    elif error == "sign of one element":
        wrong[expected.abs().argmax()] *= -1
    else:
        wrong += expected.abs().max() / 64
    with pytest.raises(AssertionError, match="max error"):
        assert_close("sum", wrong.to(dtype), expected, same_dtype, reduced_over=200)


def test_fp32_is_held_to_the_reference_not_to_the_table():
    """In fp32 a mistake of 1e-5 relative (a term of 1/N dropped from a sum over 10^5) is within the table's
    1e-4 but far above the fp32 reference's own error: the second bound refuses it."""
    expected, same_dtype = _sum_of_products(torch.float32)
    wrong = (expected * (1 + 1e-5)).float()
    with pytest.raises(AssertionError, match="reference's own error"):
        assert_close("sum", wrong, expected, same_dtype, reduced_over=200)


def test_shape_and_non_finite_values_fail():
    expected, same_dtype = _sum_of_products(torch.float32)
    with pytest.raises(AssertionError, match="shape"):
        assert_close("sum", same_dtype[:1], expected, same_dtype)
    poisoned = same_dtype.clone()
    poisoned[1] = float("nan")
    with pytest.raises(AssertionError, match="non-finite"):
        assert_close("sum", poisoned, expected, same_dtype)


def test_the_named_dtype_sets_the_tolerances():
    """A float64 sum of fp16 parts (attention's O + its residual) is checked with fp16's tolerances; the
    table has no float64 row of its own."""
    expected, same_dtype = _sum_of_products(torch.float16)
    assert_close("sum", same_dtype.double(), expected, same_dtype, reduced_over=200, dtype=torch.float16)
    with pytest.raises(AssertionError, match=r"\(torch.float16\): max error"):
        assert_close("sum", (expected * 1.01), expected, same_dtype, reduced_over=200, dtype=torch.float16)
