"""The kernels of ``sigreg_kernels.gpu.contract`` registered as one op each, as a GPU backend's are.

They stand in for the CUDA kernels (which need a GPU) when counting the device
ops of the fused path: each is one dispatched op, as each CUDA kernel is one launch.
"""

import torch

from sigreg_kernels.gpu import contract


@torch.library.custom_op("sigreg_contract::ecf_partials", mutates_args=("arrivals",))
def _ecf_partials(x: torch.Tensor, directions: torch.Tensor | None, knots: int, t_max: float,
                  arrivals: torch.Tensor | None = None) -> torch.Tensor:
    return contract.ecf_partials(x, directions, knots, t_max, arrivals)


# arrivals is the kernels' counter, left as it was found (0): not a mutation.
@torch.library.custom_op("sigreg_contract::statistic", mutates_args=())
def _statistic(partials: torch.Tensor, samples: int, knots: int, t_max: float, reduction: str,
               clip_value: float | None, grad_factor: float,
               arrivals: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return contract.statistic(partials, samples, knots, t_max, reduction, clip_value, grad_factor, arrivals)


@torch.library.custom_op("sigreg_contract::slice_gradient", mutates_args=())
def _slice_gradient(coef: torch.Tensor, scale: torch.Tensor, x: torch.Tensor, directions: torch.Tensor | None,
                    knots: int, t_max: float) -> torch.Tensor:
    return contract.slice_gradient(coef, scale, x, directions, knots, t_max)


@torch.library.custom_op("sigreg_contract::slice_gradient_", mutates_args=("projection",))
def _slice_gradient_(projection: torch.Tensor, coef: torch.Tensor, scale: torch.Tensor, knots: int,
                     t_max: float) -> None:
    contract.slice_gradient_(projection, coef, scale, knots, t_max)


# Shapes for torch.compile (one split: the contract sums all rows at once).
@_ecf_partials.register_fake
def _(x, directions, knots, t_max, arrivals=None):
    slices = x.shape[2] if directions is None else directions.shape[1]
    return x.new_empty((x.shape[0], 1, 2, slices, knots), dtype=torch.float32)


@_statistic.register_fake
def _(partials, samples, knots, t_max, reduction, clip_value, grad_factor, arrivals=None):
    batch, slices = partials.shape[0], partials.shape[3]
    return partials.new_empty((batch, slices)), partials.new_empty((batch, 2, slices, knots)), partials.new_empty(())


@_slice_gradient.register_fake
def _(coef, scale, x, directions, knots, t_max):
    slices = x.shape[2] if directions is None else directions.shape[1]
    return x.new_empty((x.shape[0], x.shape[1], slices))


@_slice_gradient_.register_fake
def _(projection, coef, scale, knots, t_max):
    return None


ecf_partials = torch.ops.sigreg_contract.ecf_partials
statistic = torch.ops.sigreg_contract.statistic
slice_gradient = torch.ops.sigreg_contract.slice_gradient
slice_gradient_ = torch.ops.sigreg_contract.slice_gradient_
