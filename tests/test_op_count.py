"""The fused GPU path launches few device ops (issue: at most 3 in the forward, 4 in the backward).

Counted with a dispatch mode (tests/op_counter.py): every aten op and every op of
the library counts, views and allocations do not. The CUDA kernels need a GPU, so
the orchestration is counted here with the contract's kernels registered as one
op each (tests/contract_kernels.py); test_cuda_registered_ops.py counts it through
the CUDA backend's registered ops (the emulated kernels as their CPU kernels),
test_triton.py through the Triton backend's (interpreted), test_cuda.py on a GPU.
"""

import pytest
import torch
from helpers import loss_and_grads, random_case
import contract_kernels
from op_counter import OpCounter

from sigreg_kernels.gpu import fused

fused.register_kernels("contract", contract_kernels)


def count_fwd_bwd(x, directions, reduction, clip_value=None):
    x = x.clone().requires_grad_()
    inputs = [x] if directions is None else [x, directions.clone().requires_grad_()]
    with OpCounter() as forward:
        loss = fused.fused_sigreg("contract", *inputs, *([None] if directions is None else []),
                                  17, 3.0, reduction, clip_value)
    upstream = torch.ones_like(loss)
    with OpCounter() as backward:
        torch.autograd.grad(loss, inputs, upstream)
    return forward, backward


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_fwd_at_most_3_and_bwd_at_most_4(dtype, reduction):
    x, directions = random_case((2,), 40, 8, 12, dtype=dtype)
    forward, backward = count_fwd_bwd(x, directions, reduction, clip_value=0.01)
    assert forward.total <= 3, forward.ops
    assert backward.total <= 4, backward.ops
    assert forward.ops["sigreg_contract::ecf_partials"] == forward.ops["sigreg_contract::statistic"] == 1
    assert forward.total == 2, forward.ops  # the statistic kernel reduces the loss itself
    assert backward.ops["sigreg_contract::slice_gradient"] == 1
    assert backward.ops["aten::mm"] == 2, backward.ops  # G·Aᵀ and xᵀ·G as library GEMMs


def test_float32_with_tf32_takes_the_fused_route():
    x, directions = random_case((1,), 40, 8, 12)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        forward, backward = count_fwd_bwd(x, directions, "mean")
    finally:
        torch.set_float32_matmul_precision(previous)
    assert forward.total <= 3 and backward.total <= 4, (forward.ops, backward.ops)
    assert "aten::mm" not in forward.ops


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_float32_highest_projects_by_sgemm_once_per_pass(reduction):
    """The SGEMM projection is one more op in each pass, still within 3 and 4."""
    x, directions = random_case((1,), 40, 8, 12)
    assert torch.get_float32_matmul_precision() == "highest"
    forward, backward = count_fwd_bwd(x, directions, reduction)
    assert forward.ops["aten::mm"] == 1 and forward.total <= 3, forward.ops
    assert backward.ops["aten::mm"] == 3 and backward.total <= 4, backward.ops
    assert backward.ops["sigreg_contract::slice_gradient_"] == 1  # G overwrites the projection: one N×K tensor


def test_univariate_test_needs_no_product():
    x, _ = random_case((3,), 40, 8, 1, dtype=torch.bfloat16)
    forward, backward = count_fwd_bwd(x, None, "mean")
    assert "aten::mm" not in forward.ops and "aten::mm" not in backward.ops
    assert forward.total == 2 and backward.total == 1, (forward.ops, backward.ops)


def test_the_counter_sees_what_it_should():
    """A chain of small torch ops is counted op by op; views and allocations are not."""
    x = torch.randn(4, 5)
    with OpCounter() as counter:
        y = torch.empty(3)
        z = x.t().unsqueeze(0)  # views
        (z.exp() * 2).sum()
    assert counter.ops == {"aten::exp": 1, "aten::mul": 1, "aten::sum": 1}, counter.ops
    del y


@pytest.mark.parametrize("directions_given", [True, False])
def test_fused_path_compiles_whole_and_matches_eager(directions_given):
    x, directions = random_case((2,), 40, 8, 12, dtype=torch.bfloat16)
    directions = directions if directions_given else None

    def sigreg_contract(x, directions=None):
        return fused.fused_sigreg("contract", x, directions, 17, 3.0, "mean", 0.001)

    eager = loss_and_grads(sigreg_contract, x, directions)
    compiled = loss_and_grads(torch.compile(sigreg_contract, fullgraph=True), x, directions)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b)  # Inductor may sum the mean in another order
