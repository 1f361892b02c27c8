"""The reference backend (the oracle every other backend is compared with) against float64 math."""

import pytest
import torch

from op_cases import BETAS, DTYPE_PAIRS, LAYOUTS, POINTWISE_OPS, SIZES, check_pointwise, check_residual, pair_id


@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=pair_id)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("op", POINTWISE_OPS)
def test_pointwise(op, n, pair):
    for beta in BETAS:
        check_pointwise("reference", op, n, pair, beta, "cpu")


@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=pair_id)
@pytest.mark.parametrize("n", SIZES)
def test_residual(n, pair):
    check_residual("reference", n, pair, "cpu")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts(layout):
    for op in POINTWISE_OPS:
        check_pointwise("reference", op, 1023, (torch.float32, torch.bfloat16), 0.8, "cpu", layout)
    check_residual("reference", 1023, (torch.float32, torch.bfloat16), "cpu", layout)
