"""The CUDA backend's launch plans in pure Python: a mirror of the C++ plan functions
in ``csrc/cuda/sigreg_cuda_kernels.cuh`` (tests/test_cuda_emulated.py checks that the
two agree over the benchmark grid), for the fake kernels (the partials' row splits
``S``) and the cost model, without a GPU or the compiled extension.

Signatures as in ``gpu/plan.py`` (``projected``: ``slices`` are the columns of the
given projection, ``dim`` is ignored). The grids depend on the shapes, ``projected``
and the SM count only; ``dtype`` and ``tensor_cores`` pick the compiled instance
(``tile["template"]``: its template arguments, as the demangler writes them).
"""

import math

import torch

from ..plan import KernelPlan

THREADS = 256                # ecf_partials and slice_gradient blocks
KNOTS_PER_PASS = 16          # knots a thread keeps in registers
MAX_ROWS_PER_SPLIT = 256     # ecf_partials: bounds the float sums each thread keeps
MIN_WAVES = 2                # every grid fills the SMs at least twice where it can
SPLIT_SEARCH = 256           # ecf_partials: row splits the plan tries beyond the fewest
MAX_GRID_X = 2**31 - 1       # the hardware's cap on gridDim.x
STATISTIC_THREADS = 256
STATISTIC_SLICES = 32        # slices per statistic block, at most
STATISTIC_CACHE = 2048       # doubles of shared memory caching a statistic block's sums
TILES = ("small", "big")     # sigreg::cuda::Tile
TILE_SHAPES = {"small": (32, 32), "big": (64, 64)}  # (rows, slices) of a block's tile
MODES = ("tensor_cores", "fma", "projected")        # sigreg::cuda::Mode
CTYPES = {torch.float32: "float", torch.float16: "__half", torch.bfloat16: "__nv_bfloat16"}

# Blocks per SM on sm_90a (65536 registers, 228 KiB shared memory), the largest over
# the instances of one kernel: [projected][tile] (blocks_per_sm of RESOURCES below).
# __launch_bounds__ caps the registers (ecf_partials: 2 blocks of 256 threads, 128
# registers; slice_gradient: 3 blocks, 80 registers), with no spills.
# tests/test_cuda_compile.py checks both tables against the compiler.
PARTIALS_BLOCKS_PER_SM = {False: {"small": 2, "big": 2}, True: {"small": 2, "big": 2}}
GRADIENT_BLOCKS_PER_SM = {False: {"small": 3, "big": 3}, True: {"small": 3, "big": 3}}

# Registers / static shared memory (bytes) of every instance: ptxas -v, CUDA 13.0, sm_90a.
# weights: the instance for sample weights (launched where the caller passes them).
_RESOURCE_TABLE = """
kernel                 type           tile   weights  tensor_cores  fma           projected
ecf_partials_kernel    float          small  no       112 18944     113 18944     91 9216
ecf_partials_kernel    float          small  yes      112 18944     113 18944     88 9216
ecf_partials_kernel    float          big    no       128 37376     127 37376     111 36864
ecf_partials_kernel    float          big    yes      128 37376     127 37376     106 36864
ecf_partials_kernel    __half         small  no       96 19456      102 19456     91 5120
ecf_partials_kernel    __half         small  yes      94 19456      102 19456     88 5120
ecf_partials_kernel    __half         big    no       118 37888     121 37888     96 18432
ecf_partials_kernel    __half         big    yes      118 37888     121 37888     95 18432
ecf_partials_kernel    __nv_bfloat16  small  no       96 19456      105 19456     91 5120
ecf_partials_kernel    __nv_bfloat16  small  yes      96 19456      106 19456     88 5120
ecf_partials_kernel    __nv_bfloat16  big    no       128 37888     116 37888     96 18432
ecf_partials_kernel    __nv_bfloat16  big    yes      128 37888     117 37888     95 18432
slice_gradient_kernel  float          small  no       72 18944      79 18944      72 9216
slice_gradient_kernel  float          small  yes      72 19072      79 19072      72 9344
slice_gradient_kernel  float          big    no       80 37376      79 37376      72 36864
slice_gradient_kernel  float          big    yes      80 37632      79 37632      72 37120
slice_gradient_kernel  __half         small  no       72 22016      72 22016      72 7168
slice_gradient_kernel  __half         small  yes      76 22144      72 22144      77 7296
slice_gradient_kernel  __half         big    no       80 47104      79 47104      72 27648
slice_gradient_kernel  __half         big    yes      78 47360      79 47360      72 27904
slice_gradient_kernel  __nv_bfloat16  small  no       72 22016      72 22016      72 7168
slice_gradient_kernel  __nv_bfloat16  small  yes      76 22144      72 22144      77 7296
slice_gradient_kernel  __nv_bfloat16  big    no       80 47104      79 47104      72 27648
slice_gradient_kernel  __nv_bfloat16  big    yes      80 47360      79 47360      72 27904
"""


def _resources(table: str) -> dict:
    """{(kernel, ctype, tile, mode, weighted): (registers, static shared memory bytes)} from the table above."""
    rows = [line.split() for line in table.strip().splitlines()[1:]]
    return {(kernel, ctype, tile, mode, weights == "yes"): (int(values[2 * i]), int(values[2 * i + 1]))
            for kernel, ctype, tile, weights, *values in rows for i, mode in enumerate(MODES)}


RESOURCES = _resources(_RESOURCE_TABLE)


def blocks_per_sm(registers: int, shared_bytes: int, threads: int = THREADS) -> int:
    """Resident blocks of one kernel per SM on sm_90a (the cost model's rule)."""
    by_registers = 65536 // (max(8, math.ceil(registers / 8) * 8) * threads)
    by_shared = (228 * 1024) // (shared_bytes + 1024)
    return min(by_registers, by_shared, 32, 2048 // threads)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _mode(tensor_cores: bool, projected: bool) -> str:
    return "projected" if projected else ("tensor_cores" if tensor_cores else "fma")


def _tile(tile_blocks_big: int, blocks_per_sm_big: int, num_sms: int) -> str:
    """The big tile where its grid alone fills the machine MIN_WAVES times, else the small one."""
    return "big" if tile_blocks_big >= MIN_WAVES * num_sms * blocks_per_sm_big else "small"


def _instance(kernel, dtype, tile, mode, weighted=False) -> dict:
    ctype = CTYPES.get(dtype, str(dtype))  # (an unsupported dtype: the launcher says so)
    block_n, block_k = TILE_SHAPES[tile]
    info = {"BLOCK_N": block_n, "BLOCK_K": block_k, "MODE": mode,
            "template": f"{ctype}, {TILES.index(tile)}, {MODES.index(mode)}, {'true' if weighted else 'false'}"}
    if (kernel, ctype, tile, mode, weighted) in RESOURCES:
        info["registers"], info["static_smem"] = RESOURCES[kernel, ctype, tile, mode, weighted]
    return info


def plan_ecf_partials(batch, samples, dim, slices, knots, dtype, tensor_cores, projected, num_sms,
                      max_grid_x=MAX_GRID_X) -> KernelPlan:
    """Blocks (b, knot pass, row split, slice tile) of one 1-D grid. The row splits: at least
    MIN_WAVES waves (and at most MAX_ROWS_PER_SPLIT rows each), and among up to twice that
    many (SPLIT_SEARCH more at most) the one with the fewest rows x rounds of blocks, so the
    last wave is a full one."""
    batch1, passes = max(batch, 1), _ceil_div(knots - 1, KNOTS_PER_PASS)
    per_sm = PARTIALS_BLOCKS_PER_SM[bool(projected)]
    big_blocks = batch1 * passes * _ceil_div(samples, 64) * _ceil_div(slices, 64)
    tile = _tile(big_blocks, per_sm["big"], num_sms)
    k_tiles = _ceil_div(slices, TILE_SHAPES[tile][1])
    other, wave = batch1 * passes * k_tiles, num_sms * per_sm[tile]
    lowest = min(max(_ceil_div(MIN_WAVES * wave, other), _ceil_div(samples, MAX_ROWS_PER_SPLIT)), samples)
    best_rows, best_cost = _ceil_div(samples, lowest), None
    for splits in range(lowest, min(lowest + min(lowest, SPLIT_SEARCH), samples) + 1):  # many waves: moot
        rows = _ceil_div(samples, splits)
        if _ceil_div(samples, rows) != splits:
            continue  # the same rows as fewer splits
        cost = _ceil_div(other * splits, wave) * rows
        if best_cost is None or cost < best_cost:
            best_rows, best_cost = rows, cost
    splits = _ceil_div(samples, best_rows)
    blocks = other * splits
    info = _instance("ecf_partials_kernel", dtype, tile, _mode(tensor_cores, projected))
    info.update(KNOTS_PER_PASS=KNOTS_PER_PASS, passes=passes, k_tiles=k_tiles)
    return KernelPlan("ecf_partials_kernel", (blocks, 1, 1), THREADS, info, splits=splits, rows_per_split=best_rows,
                      launches=_ceil_div(blocks, max_grid_x))


def plan_statistic(batch, splits, slices, knots, num_sms, max_grid_x=MAX_GRID_X) -> KernelPlan:
    """Blocks (b, group of slices), about one (slice, knot, cos or sin) per thread; the group's
    sums stay in shared memory when they fit."""
    per_block = min(max(STATISTIC_THREADS // (2 * knots), 1), STATISTIC_SLICES)
    blocks = batch * _ceil_div(slices, per_block)
    info = {"slices_per_block": per_block, "cached": 2 * per_block * knots <= STATISTIC_CACHE}
    return KernelPlan("statistic_kernel", (blocks, 1, 1), STATISTIC_THREADS, info,
                      launches=_ceil_div(blocks, max_grid_x))


def plan_slice_gradient(batch, samples, dim, slices, knots, dtype, tensor_cores, projected, num_sms,
                        max_grid_x=MAX_GRID_X) -> KernelPlan:
    """Blocks (b, row tile, slice tile) of one 1-D grid."""
    per_sm = GRADIENT_BLOCKS_PER_SM[bool(projected)]
    tile = _tile(batch * _ceil_div(samples, 64) * _ceil_div(slices, 64), per_sm["big"], num_sms)
    block_n, block_k = TILE_SHAPES[tile]
    n_tiles, k_tiles = _ceil_div(samples, block_n), _ceil_div(slices, block_k)
    blocks = batch * n_tiles * k_tiles
    info = _instance("slice_gradient_kernel", dtype, tile, _mode(tensor_cores, projected))
    info.update(KNOTS_PER_PASS=KNOTS_PER_PASS, passes=_ceil_div(knots - 1, KNOTS_PER_PASS), n_tiles=n_tiles,
                k_tiles=k_tiles)
    return KernelPlan("slice_gradient_kernel", (blocks, 1, 1), THREADS, info, launches=_ceil_div(blocks, max_grid_x))
