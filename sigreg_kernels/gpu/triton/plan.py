"""How the Triton backend launches its kernels: tiles, grids and splits from the shapes.

Pure Python (no triton, no device): ``gpu/triton/ops.py`` launches exactly what these
functions return, and the cost model (``bench/cost_model.py``) reads the same plans.
Signatures: ``gpu/plan.py``. No autotuning: a plan depends on the shapes, the dtype
and ``num_sms`` only, so results never depend on timing and reruns sum in the same order.

The waves criterion (the GPU design note): for ecf_partials and slice_gradient with
N * K >= 2^20, blocks >= 2 * num_sms * blocks_per_sm, blocks_per_sm from the compiled
resources (RESOURCES). Each plan walks its candidate list (preferred first) and takes
the first candidate whose most-split grid reaches MIN_WAVES, then splits the rows (the
ecf splits S; the slice_gradient row groups) for 2 to 4 waves, the last one as full as
the tiles allow (_rows_per_split).

Why these candidates (L2 traffic per element of the N x K product, D features):
x is reloaded once per slice block (2 D / BLOCK_K bytes); the directions once per
program when resident in shared memory, else once per row tile (2 D / BLOCK_N). The
waves criterion fixes the number of programs, so resident directions with 128-slice
blocks (8 warps) come first; streamed ones (D > 512) want the wider row tile. Where
a 2-block-per-SM variant would give too few waves (N K = 2^20), the next candidate
holds one block per SM. The projected kernels (P given) use few registers, hence many
blocks per SM: their small grids take the small tiles.

Calls with sample weights plan alike from WEIGHTED_RESOURCES (the weighted kernels'
own), skipping the configs that spill with weights; unweighted plans do not change.
"""

import math
from dataclasses import dataclass

from ..plan import KernelPlan

# An H100/H200 SM, as the cost model counts it.
SM_REGISTERS = 65536
SM_SHARED_BYTES = 228 * 1024
SHARED_RESERVED_PER_BLOCK = 1024
SM_MAX_BLOCKS = 32
SM_MAX_THREADS = 2048
MAX_GRID_YZ = 65535            # CUDA's cap on grid axes 1 and 2 (axis 2 carries the batch)

MIN_WAVES = 2                  # the criterion
MAX_WAVES = 4                  # splits / row groups: between MIN_WAVES and MAX_WAVES, whole waves
KNOT_CHUNK = 16                # knots per unrolled chunk (registers: 2 slices x 2 x 16 per thread)
STAT_BLOCK_K = 32              # statistic kernel: slices per program
STAT_SUM_BLOCK = 128           # statistic kernel: programs' partial losses the last one loads at a time
# The largest resident A^T tile: bf16 128 slices x 512 features (+ 3 x-tile stages: 176 KB).
RESIDENT_BYTES = {"16": 128 * 1024, "tf32": 64 * 1024, "ieee": 64 * 1024}


@dataclass(frozen=True)
class TileConfig:
    name: str
    block_k: int               # slices per tile (the MMA's M axis for the dot kernels)
    block_n: int               # samples per tile
    num_warps: int
    num_stages: int            # software pipelining of the loads (loop over D, or over rows)
    warps_n: int = 1           # warps along the samples axis of the MMA layout (dot kernels)
    resident_stages: int = 0   # num_stages when the directions are resident (0: num_stages)
    lean_rotation: bool = False  # forward: rotate cos - 1 from (u1, s1) alone (one register less per element)
    weights: bool = True       # serves calls with sample weights (WEIGHTED_RESOURCES)

    @property
    def threads(self) -> int:
        return 32 * self.num_warps

    def stages(self, resident: bool) -> int:
        return self.resident_stages if resident and self.resident_stages else self.num_stages


# Dot kernels (directions given): [block_k slices, block_n samples] tiles, wgmma with the
# slices on M (64 per warpgroup of 4 warps; 8 warps: 128 slices, warps [8, 1]). Each
# thread holds 2 slices and block_n / 4 samples: the forward keeps 64 accumulator
# registers plus ~5 per element held.
ECF_128x16 = TileConfig("ecf_128x16", 128, 16, num_warps=8, num_stages=3)
# 32 samples per thread: the third rotation constant of the cos - 1 recurrence would not fit
# 255 registers; this tile serves large D, where the projection's MMA sets the time. With
# sample weights it spills (~190 bytes): weighted calls take the next candidate.
ECF_128x32 = TileConfig("ecf_128x32", 128, 32, num_warps=8, num_stages=3, lean_rotation=True, weights=False)
ECF_64x16 = TileConfig("ecf_64x16", 64, 16, num_warps=4, num_stages=3)
GRAD_128x32 = TileConfig("grad_128x32", 128, 32, num_warps=8, num_stages=3, resident_stages=2)
GRAD_128x16 = TileConfig("grad_128x16", 128, 16, num_warps=8, num_stages=3, resident_stages=2)
GRAD_64x16 = TileConfig("grad_64x16", 64, 16, num_warps=4, num_stages=3)
# Projected kernels (directions=None): [block_n samples, block_k slices] tiles with lanes
# and warps along the slices (block_k = 32 * num_warps), each thread's samples in registers.
ECF_P_8x128 = TileConfig("ecf_p_8x128", 128, 8, num_warps=4, num_stages=2)
ECF_P_4x128 = TileConfig("ecf_p_4x128", 128, 4, num_warps=4, num_stages=2)
GRAD_P_16x128 = TileConfig("grad_p_16x128", 128, 16, num_warps=4, num_stages=2)
GRAD_P_2x128 = TileConfig("grad_p_2x128", 128, 2, num_warps=4, num_stages=2)
STAT_CONFIG = TileConfig("stat_32", STAT_BLOCK_K, 1, num_warps=4, num_stages=1)

# Candidates in order of preference: (config, directions mode). "resident" is skipped
# where A^T [block_k, D] does not fit RESIDENT_BYTES; 64-slice configs serve K <= 64.
ECF_CANDIDATES = ((ECF_128x16, "resident"), (ECF_128x32, "streamed"), (ECF_128x16, "streamed"),
                  (ECF_64x16, "resident"), (ECF_64x16, "streamed"))
GRAD_CANDIDATES = ((GRAD_128x32, "resident"), (GRAD_128x32, "streamed"), (GRAD_128x16, "streamed"),
                   (GRAD_64x16, "resident"), (GRAD_64x16, "streamed"))
ECF_PROJECTED_CANDIDATES = ((ECF_P_8x128, "projected"), (ECF_P_4x128, "projected"))
GRAD_PROJECTED_CANDIDATES = ((GRAD_P_16x128, "projected"), (GRAD_P_2x128, "projected"))

# Compiled resources: (config, operand class, feature block) -> (registers per thread,
# shared memory bytes), none spilling. Operand class: "16" fp16/bf16 (wgmma), "tf32"
# fp32 with TF32 (wgmma), "fp32" a float32 projection (projected kernels). Feature
# block: the resident A^T width ("64", "512"), "s64"/"s32" for the loop over D, "p" for
# the projected kernels. Measured by `python tests/test_triton_plan.py`: triton 3.9
# compiling for sm_90a, ptxas 13.x -v, 17 knots, contiguous inputs with shapes divisible
# by 16 (the benchmark grid). What fills the registers: the forward's 64 accumulators
# (2 slices x 16 knots x cos/sin) and ~6 per element (p, u = cos - 1, s, c1, u1, s1); the backward's 64
# gamma registers and ~4 per element (h_re, h_im, c1, s1). Shared memory: the resident
# A^T tile plus the pipelined x^T tiles. An entry missing here (other knots, fp16 P, ...)
# falls back to the config's heaviest entry.
RESOURCES_TRITON = "3.9"  # the triton that compiled them (3.6 was within a few registers, same occupancy)
RESOURCES = {
    ('ecf_128x16', '16', '512'): (156, 180224),   # 1 block/SM (shared memory)
    ('ecf_128x16', '16', '64'): (128, 22528),     # 2 blocks/SM
    ('ecf_128x16', '16', 's64'): (170, 55296),    # 1 block/SM (registers)
    ('ecf_128x16', 'tf32', '64'): (127, 45056),
    ('ecf_128x16', 'tf32', 's32'): (170, 55296),
    ('ecf_128x32', '16', 's64'): (192, 61440),    # lean rotation
    ('ecf_128x32', 'tf32', 's32'): (189, 61440),
    ('ecf_64x16', '16', '512'): (180, 114688),
    ('ecf_64x16', '16', '64'): (127, 14336),
    ('ecf_64x16', '16', 's64'): (167, 30720),
    ('ecf_64x16', 'tf32', '64'): (126, 28672),
    ('ecf_64x16', 'tf32', 's32'): (167, 30720),
    ('ecf_p_8x128', 'fp32', 'p'): (128, 4096),
    ('ecf_p_4x128', 'fp32', 'p'): (106, 4096),
    ('grad_128x32', '16', '512'): (148, 200704),  # 2 x-tile stages; 1 block/SM (shared memory)
    ('grad_128x32', '16', '64'): (128, 28672),
    ('grad_128x32', '16', 's64'): (192, 61440),
    ('grad_128x32', 'tf32', '64'): (128, 65536),
    ('grad_128x32', 'tf32', 's32'): (190, 61440),
    ('grad_128x16', '16', 's64'): (163, 55296),
    ('grad_128x16', 'tf32', 's32'): (166, 55296),
    ('grad_64x16', '16', '512'): (180, 116736),
    ('grad_64x16', '16', '64'): (96, 16384),
    ('grad_64x16', '16', 's64'): (159, 30720),
    ('grad_64x16', 'tf32', '64'): (128, 32768),
    ('grad_64x16', 'tf32', 's32'): (163, 30720),
    ('grad_p_16x128', 'fp32', 'p'): (136, 8192),
    ('grad_p_2x128', 'fp32', 'p'): (64, 8192),
    ('stat_32', 'fp32', '-'): (56, 128),
}
# The same with sample weights (HAS_WEIGHTS, HAS_MOMENTS), measured alike; the plans use
# these for weighted calls. The dot kernels' forward holds ~40 registers more: the cost of
# a load per row tile in that loop (as many when the weights enter only knot 0), not of the
# weighting itself, so the 64-feature resident configs hold 1 block per SM instead of 2.
# ecf_128x32 spills with weights and is left out (TileConfig.weights).
WEIGHTED_RESOURCES = {
    ('ecf_128x16', '16', '512'): (175, 180224),
    ('ecf_128x16', '16', '64'): (167, 22528),
    ('ecf_128x16', '16', 's64'): (204, 55296),
    ('ecf_128x16', 'tf32', '64'): (171, 45056),
    ('ecf_128x16', 'tf32', 's32'): (208, 55296),
    ('ecf_64x16', '16', '512'): (227, 114688),
    ('ecf_64x16', '16', '64'): (168, 14336),
    ('ecf_64x16', '16', 's64'): (200, 30720),
    ('ecf_64x16', 'tf32', '64'): (167, 28672),
    ('ecf_64x16', 'tf32', 's32'): (203, 30720),
    ('ecf_p_4x128', 'fp32', 'p'): (128, 4096),
    ('ecf_p_8x128', 'fp32', 'p'): (168, 4096),
    ('grad_128x16', '16', 's64'): (150, 55296),
    ('grad_128x16', 'tf32', 's32'): (156, 55296),
    ('grad_128x32', '16', '512'): (148, 200704),
    ('grad_128x32', '16', '64'): (128, 28672),
    ('grad_128x32', '16', 's64'): (160, 61440),
    ('grad_128x32', 'tf32', '64'): (128, 65536),
    ('grad_128x32', 'tf32', 's32'): (166, 61440),
    ('grad_64x16', '16', '512'): (184, 116736),
    ('grad_64x16', '16', '64'): (122, 16384),
    ('grad_64x16', '16', 's64'): (150, 30720),
    ('grad_64x16', 'tf32', '64'): (128, 32768),
    ('grad_64x16', 'tf32', 's32'): (151, 30720),
    ('grad_p_16x128', 'fp32', 'p'): (148, 8192),
    ('grad_p_2x128', 'fp32', 'p'): (64, 8192),
    ('stat_32', 'fp32', '-'): (56, 128),
}


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def dtype_name(dtype) -> str:
    """'fp32', 'bf16' or 'fp16' from a torch dtype or its name."""
    name = str(dtype).replace("torch.", "")
    names = {"float32": "fp32", "fp32": "fp32", "float": "fp32", "bfloat16": "bf16", "bf16": "bf16",
             "float16": "fp16", "fp16": "fp16", "half": "fp16"}
    if name not in names:
        raise TypeError(f"the triton kernels take float32, bfloat16 or float16, got {dtype}")
    return names[name]


def operand_class(dtype, tensor_cores: bool) -> str:
    if dtype_name(dtype) != "fp32":
        return "16"
    return "tf32" if tensor_cores else "ieee"


def knot_chunk(knots: int) -> int:
    """Knots per unrolled chunk: all of 1..knots-1 up to 16 (rounded up to a power of two), else 16."""
    return min(KNOT_CHUNK, _next_power_of_2(max(1, knots - 1)))


def knot_chunks(knots: int) -> int:
    return _cdiv(max(1, knots - 1), knot_chunk(knots))


def feature_block(dim: int, operands: str, block_k: int, mode: str) -> int:
    """BLOCK_D: all of D (a power of two >= 16) when resident, else the streamed chunk;
    0 when a resident A^T tile would not fit RESIDENT_BYTES."""
    if mode == "streamed":
        return 64 if operands == "16" else 32
    width = max(16, _next_power_of_2(dim))
    element = 2 if operands == "16" else 4
    return width if width * block_k * element <= RESIDENT_BYTES[operands] else 0


def blocks_per_sm(registers: int, shared: int, threads: int) -> int:
    """The cost model's occupancy: registers (rounded up to 8 per thread), shared memory
    (+1 KiB per block), 32 blocks, 2048 threads."""
    by_registers = SM_REGISTERS // (_cdiv(registers, 8) * 8 * threads)
    by_shared = SM_SHARED_BYTES // (shared + SHARED_RESERVED_PER_BLOCK)
    return max(1, min(by_registers, by_shared, SM_MAX_BLOCKS, SM_MAX_THREADS // threads))


def resources(config: TileConfig, operands: str, block: str, weighted: bool = False) -> tuple[int, int]:
    """(registers, shared bytes) of a compiled config, as recorded in RESOURCES (WEIGHTED_RESOURCES)."""
    table = WEIGHTED_RESOURCES if weighted else RESOURCES
    if (config.name, operands, block) in table:
        return table[config.name, operands, block]
    known = [value for (name, _, _), value in table.items() if name == config.name]
    if known:  # the config's heaviest recorded variant: the plan stays a function of the shapes
        return max(known)
    return 255, 0  # an unrecorded config: assume the worst registers


def resource_key(config: TileConfig, operands: str, mode: str, block_d: int) -> tuple[str, str, str]:
    if mode == "projected":
        return config.name, ("16" if operands == "16" else "fp32"), "p"
    return config.name, operands, (str(block_d) if mode == "resident" else f"s{block_d}")


@dataclass(frozen=True)
class _Choice:
    config: TileConfig
    mode: str
    block_d: int
    blocks_per_sm: int
    registers: int
    shared: int
    column_blocks: int         # programs per row split: batch x slice blocks x knot chunks
    rows_per_split: int
    splits: int


def _rows_per_split(tiles: int, column_blocks: int, slots: int) -> int:
    """Tiles per row split: waves (blocks / slots) in [MIN_WAVES, MAX_WAVES] where the tiles
    allow, as close below a whole number as can be (the last, partial wave costs a whole
    one), then the fewest splits (each reloads the directions and writes its partials)."""
    options = {1, tiles}
    for whole in range(MIN_WAVES, MAX_WAVES + 1):
        exact = whole * slots / column_blocks
        for splits in (int(exact), int(exact) + 1):
            if splits >= 1:
                options.add(_cdiv(tiles, splits))
    options = {max(per_split, _cdiv(tiles, MAX_GRID_YZ)) for per_split in options}

    def score(per_split):
        waves = _cdiv(tiles, per_split) * column_blocks / slots
        usable = MIN_WAVES <= waves <= MAX_WAVES
        return usable, waves / math.ceil(waves) if usable else min(waves, MIN_WAVES), per_split

    return max(options, key=score)


def _choose(candidates, batch, samples, dim, slices, operands, chunks, num_sms, min_waves, weighted) -> _Choice:
    narrow = [c for c in candidates if c[0].block_k <= max(64, _next_power_of_2(slices))] or list(candidates)
    best = None
    for config, mode in narrow:
        block_d = 0 if mode == "projected" else feature_block(dim, operands, config.block_k, mode)
        if mode == "resident" and not block_d:
            continue
        registers, shared = resources(config, *resource_key(config, operands, mode, block_d)[1:], weighted)
        bps = blocks_per_sm(registers, shared, config.threads)
        column_blocks = batch * _cdiv(slices, config.block_k) * chunks
        tiles = _cdiv(samples, config.block_n)
        most_waves = column_blocks * min(tiles, MAX_GRID_YZ) / (num_sms * bps)
        rows = _rows_per_split(tiles, column_blocks, num_sms * bps) * config.block_n
        choice = _Choice(config, mode, block_d, bps, registers, shared, column_blocks, rows, _cdiv(samples, rows))
        if most_waves >= min_waves:
            return choice
        if best is None or most_waves > best[0]:
            best = (most_waves, choice)
    if best is None:
        raise ValueError("no candidate config fits")
    return best[1]


def _tile(choice: _Choice, knots: int) -> dict:
    config = choice.config
    tile = {"BLOCK_K": config.block_k, "BLOCK_N": config.block_n, "KC": knot_chunk(knots),
            "num_warps": config.num_warps, "num_stages": config.stages(choice.mode == "resident")}
    if choice.mode != "projected":
        tile.update(BLOCK_D=choice.block_d, RESIDENT=choice.mode == "resident")
    tile.update(config=config.name, mode=choice.mode, registers=choice.registers, shared=choice.shared,
                blocks_per_sm=choice.blocks_per_sm)
    return tile


def _weighted_candidates(candidates, weighted: bool):
    return tuple(c for c in candidates if c[0].weights) if weighted else candidates


def plan_ecf_partials(batch: int, samples: int, dim: int, slices: int, knots: int, dtype,
                      tensor_cores: bool, projected: bool, num_sms: int, candidates=None,
                      min_waves: float = MIN_WAVES, weighted: bool = False) -> KernelPlan:
    """``candidates``: (config, mode) pairs to choose from instead of the module's (tests).
    ``min_waves=0``: the first candidate whatever the grid (the interpreter, which pays per tile).
    ``weighted``: for the kernels with sample weights (their own resources; unweighted plans
    are the same either way)."""
    operands = operand_class(dtype, tensor_cores)
    chunks = knot_chunks(knots)
    default = _weighted_candidates(ECF_PROJECTED_CANDIDATES if projected else ECF_CANDIDATES, weighted)
    choice = _choose(candidates or default, batch, samples, dim, slices, operands, chunks, num_sms, min_waves,
                     weighted)
    tile = _tile(choice, knots)
    tile["LEAN"] = choice.config.lean_rotation
    if not projected:
        tile["WARPS_N"] = choice.config.warps_n
    return KernelPlan(kernel="ecf_partials_projected_kernel" if projected else "ecf_partials_kernel",
                      grid=(_cdiv(slices, choice.config.block_k) * chunks, choice.splits, batch),
                      threads=choice.config.threads, tile=tile, splits=choice.splits,
                      rows_per_split=choice.rows_per_split, launches=_cdiv(batch, MAX_GRID_YZ))


def plan_statistic(batch: int, splits: int, slices: int, knots: int, num_sms: int) -> KernelPlan:
    """One program per (batch index, 32 slices): tiny (B K T work), exempt from the waves criterion."""
    registers, shared = resources(STAT_CONFIG, "fp32", "-")
    tile = {"BLOCK_K": STAT_BLOCK_K, "KNOTS_PAD": _next_power_of_2(knots), "SUM_BLOCK": STAT_SUM_BLOCK,
            "num_warps": STAT_CONFIG.num_warps,
            "num_stages": STAT_CONFIG.num_stages, "config": STAT_CONFIG.name, "registers": registers,
            "shared": shared, "blocks_per_sm": blocks_per_sm(registers, shared, STAT_CONFIG.threads)}
    return KernelPlan(kernel="statistic_kernel", grid=(batch * _cdiv(slices, STAT_BLOCK_K), 1, 1),
                      threads=STAT_CONFIG.threads, tile=tile, splits=splits)


def plan_slice_gradient(batch: int, samples: int, dim: int, slices: int, knots: int, dtype,
                        tensor_cores: bool, projected: bool, num_sms: int, candidates=None,
                        min_waves: float = MIN_WAVES, weighted: bool = False) -> KernelPlan:
    """As plan_ecf_partials; ``rows_per_split`` holds the rows of each program (grid axis 1:
    the row groups)."""
    operands = operand_class(dtype, tensor_cores)
    default = _weighted_candidates(GRAD_PROJECTED_CANDIDATES if projected else GRAD_CANDIDATES, weighted)
    choice = _choose(candidates or default, batch, samples, dim, slices, operands, 1, num_sms, min_waves,
                     weighted)
    return KernelPlan(kernel="slice_gradient_projected_kernel" if projected else "slice_gradient_kernel",
                      grid=(_cdiv(slices, choice.config.block_k), choice.splits, batch),
                      threads=choice.config.threads, tile=_tile(choice, knots),
                      rows_per_split=choice.rows_per_split, launches=_cdiv(batch, MAX_GRID_YZ))


def waves(plan: KernelPlan, num_sms: int) -> float:
    """blocks / (num_sms * blocks_per_sm): the cost model's waves of a plan."""
    return plan.blocks / (num_sms * plan.tile["blocks_per_sm"])
