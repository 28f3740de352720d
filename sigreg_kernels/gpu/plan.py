"""How a GPU backend launches one of its kernels for one problem: a plain record.

Each GPU backend has a pure-Python plan module (``gpu/triton/plan.py``, ``gpu/cuda/plan.py``)
with one function per kernel of ``gpu/contract.py``, returning a ``KernelPlan``:

    plan_ecf_partials(batch, samples, dim, slices, knots, dtype, tensor_cores, projected, num_sms)
    plan_statistic(batch, splits, slices, knots, num_sms)
    plan_slice_gradient(batch, samples, dim, slices, knots, dtype, tensor_cores, projected, num_sms)

``projected``: the kernel reads a given projection (``directions=None``; ``dim`` is
then ignored and the columns of ``x`` are the slices) instead of computing its
tiles with a matrix product. ``tensor_cores``: 16-bit inputs, or float32 with TF32
allowed. The launchers call these same functions, so the cost model
(``bench/cost_model.py``) sees the grids the kernels really get, without a GPU.
"""

from dataclasses import dataclass, field


@dataclass(frozen=True)
class KernelPlan:
    kernel: str                     # the kernel's name: Triton JIT function or CUDA __global__ function
    grid: tuple[int, int, int]      # blocks (programs) on each grid axis, over all launches
    threads: int                    # threads per block (Triton: 32 * num_warps)
    tile: dict = field(default_factory=dict)  # block sizes and other compile-time parameters
    splits: int = 1                 # ecf_partials: row splits S (the partials' second axis)
    rows_per_split: int = 0         # ecf_partials: rows R of each split
    launches: int = 1               # launches (more than one only past the 65535 grid cap)

    @property
    def blocks(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]
