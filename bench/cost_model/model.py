"""Rows of the cost model: what each pass runs, per backend, and each kernel's predicted time and floor."""

import importlib
import math
from dataclasses import dataclass

from . import hardware as hw
from .resources import Kernel, ModelError

BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
PLAN_MODULES = {"cuda": "sigreg_kernels.gpu.cuda.plan", "triton": "sigreg_kernels.gpu.triton.plan"}
PLAN_FUNCTIONS = ("plan_ecf_partials", "plan_statistic", "plan_slice_gradient")
OWN_KERNELS = ("ecf_partials", "statistic", "slice_gradient")
WAVES_KERNELS = ("ecf_partials", "slice_gradient")  # the criterion: waves >= 2 where N*K >= 2^20
COLUMNS = ("backend", "kernel", "pass", "batch", "N", "D", "K", "dtype", "blocks", "blocks_per_sm", "waves",
           "flops", "bytes", "predicted_us", "floor_us")


@dataclass(frozen=True)
class Case:
    backend: str
    dtype: str       # "bf16", "fp16": tensor cores; "fp32": "highest" precision, the SGEMM route
    batch: int
    N: int
    D: int
    K: int
    knots: int = 17
    grad_directions: bool = False
    cast_directions: bool = True  # the benchmark's directions are float32, cast under autocast
    weights: bool = False  # sample weights (a padding mask): a load and a multiply per row in the kernels

    @property
    def sgemm_route(self) -> bool:
        return self.dtype == "fp32"


@dataclass
class Row:
    backend: str
    kernel: str         # the role: ecf_partials, statistic, slice_gradient, gemm_*, cast_directions
    pass_: str
    batch: int
    N: int
    D: int
    K: int
    dtype: str
    blocks: int
    blocks_per_sm: int
    waves: float
    flops: float        # matrix-product flops (2 per multiply-add)
    bytes: float        # DRAM bytes
    predicted_us: float
    floor_us: float
    function: str = ""  # the kernel launched (plan's name), or the library's op
    registers: int = 0
    smem: int = 0
    mma: str = ""
    bound: str = ""     # which term set the time: tc+fp32, dram, l2, launch
    note: str = ""      # where the plan's own record of the resources differs from the compiled kernel

    def csv(self) -> dict:
        values = {c: getattr(self, "pass_" if c == "pass" else c) for c in COLUMNS}
        for c in ("waves", "predicted_us", "floor_us"):
            values[c] = round(values[c], 4)
        return values


def load_plans(backend: str):
    """The backend's plan module, with its three functions, or a clear error."""
    name = PLAN_MODULES[backend]
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as error:
        if error.name != name:
            raise
        raise ModelError(f"{name} is not there yet: the {backend} rows need its plan functions "
                         f"{', '.join(PLAN_FUNCTIONS)}") from None
    except Exception as error:  # noqa: BLE001 - e.g. an extension built from older sources
        raise ModelError(f"importing {name} failed: {type(error).__name__}: {error}") from None
    missing = [f for f in PLAN_FUNCTIONS if not callable(getattr(module, f, None))]
    if missing:
        raise ModelError(f"{name} lacks {', '.join(missing)}")
    return module


def blocks_per_sm(registers: int, smem: int, threads: int) -> int:
    """Resident blocks per SM: the least of the register, shared-memory, block and thread limits."""
    per_thread = max(hw.REGISTER_GRANULE, math.ceil(registers / hw.REGISTER_GRANULE) * hw.REGISTER_GRANULE)
    by_registers = hw.REGISTERS_PER_SM // (per_thread * threads)
    by_smem = hw.SMEM_PER_SM // (smem + hw.SMEM_RESERVED_PER_BLOCK)
    return min(by_registers, by_smem, hw.MAX_BLOCKS_PER_SM, hw.MAX_THREADS_PER_SM // threads)


def waves_of(blocks: int, per_sm: int, gpu) -> float:
    return blocks / (gpu.sms * per_sm)


def dynamic_smem(plan) -> int:
    """Shared memory a CUDA plan asks for at launch (dynamic), which ptxas cannot see."""
    for key in ("dynamic_smem", "smem_bytes", "shared_memory"):
        if key in plan.tile:
            return int(plan.tile[key])
    return 0


def tile_reloads(case: Case, plan, size: int) -> float:
    """L2 -> SM bytes of the projection tiles: x once per slice tile, A once per row tile
    (once per block where the plan keeps A's tile resident, tile["RESIDENT"])."""
    tile = {k.upper(): v for k, v in plan.tile.items()}
    block_n, block_k = tile.get("BLOCK_N", 64), tile.get("BLOCK_K", 64)
    x_bytes = case.batch * case.N * case.D * size * math.ceil(case.K / block_k)
    a_loads = plan.blocks if tile.get("RESIDENT") else case.batch * math.ceil(case.N / block_n) * math.ceil(
        case.K / block_k)
    return x_bytes + a_loads * case.D * block_k * size


def plan_disagrees(plan, kernel: Kernel, per_sm: int) -> str:
    """The plan's own record (tile["registers"], tile["blocks_per_sm"]) where the compiled kernel differs."""
    name = plan.tile.get("config", plan.tile.get("template", ""))
    found = [f"{key} {plan.tile[key]} recorded, {actual} compiled"
             for key, actual in (("registers", kernel.registers), ("blocks_per_sm", per_sm))
             if key in plan.tile and plan.tile[key] != actual]
    return f"{plan.kernel}<{name}>: {', '.join(found)}" if found else ""


def elementwise_slots(case: Case, role: str, lean_rotation: bool = False) -> tuple:
    """Issue slots of the element loop (hardware.py's counts), and its floor (without the extras:
    the floor counts the 4-slot rotation whatever the tile does)."""
    elements = case.batch * case.N * case.K
    floor = elements * (hw.SINCOS_SLOTS + (case.knots - 1) * (hw.ROTATION_SLOTS + hw.ACCUMULATE_SLOTS))
    rotation = hw.LEAN_ROTATION_SLOTS if lean_rotation else hw.ROTATION_SLOTS
    slots = elements * (hw.SINCOS_SLOTS + (case.knots - 1) * (rotation + hw.ACCUMULATE_SLOTS))
    extra = hw.FORWARD_EXTRA_SLOTS if role == "ecf_partials" else hw.BACKWARD_EXTRA_SLOTS
    if case.weights:
        extra += hw.WEIGHT_SLOTS
    return slots + elements * extra, floor


def own_kernel(gpu, case: Case, pass_: str, role: str, plan, kernel: Kernel, splits: int = 1) -> Row:
    """One of the backend's kernels: (tensor-core + FP32-pipe time, or DRAM, or L2) x quantization + launch."""
    b, n, d, k, t = case.batch, case.N, case.D, case.K, case.knots
    size = BYTES[case.dtype]
    projected = case.sgemm_route
    coef_bytes = b * 2 * k * t * 4
    tc_flops = floor_compute = floor_bytes = 0.0
    if role == "statistic":
        slots = b * k * t * (splits + hw.STATISTIC_SLOTS)
        dram = b * splits * 2 * k * t * 4 + coef_bytes + b * k * 4 + plan.blocks * 8 * 2  # + partial losses
        l2 = dram
    else:
        slots, floor_slots = elementwise_slots(case, role, plan.tile.get("LEAN", False))
        if projected:
            dram = b * n * k * 4 * (1 if role == "ecf_partials" else 2)  # read P (and write G over it)
            l2 = dram
        else:
            tc_flops = 2.0 * b * n * d * k
            inputs = b * n * d * size + d * k * size
            dram = inputs + (b * n * k * size if role == "slice_gradient" else 0)
            l2 = tile_reloads(case, plan, size) + dram - inputs
            floor_compute += tc_flops / (gpu.bf16_tflops * 1e12)
            floor_bytes = inputs / (gpu.dram_tbs * 1e12)
        dram += b * plan.splits * 2 * k * t * 4 if role == "ecf_partials" else coef_bytes  # partials out, coef in
        if case.weights:  # one float per row (re-read per slice tile from L2)
            dram += b * n * 4
            l2 += b * n * 4 * math.ceil(k / plan.tile.get("BLOCK_K", 64))
        floor_compute += floor_slots / gpu.issue_rate
    floor_us = max(floor_compute, floor_bytes) * 1e6  # roofline: the compulsory bytes overlap the arithmetic
    threads = plan.threads
    smem = kernel.smem + dynamic_smem(plan)
    per_sm = blocks_per_sm(kernel.registers, smem, threads)
    blocks = plan.blocks
    note = plan_disagrees(plan, kernel, per_sm)
    if per_sm == 0:  # cannot launch: the criteria report it
        return Row(case.backend, role, pass_, b, n, d, k, case.dtype, blocks, 0, math.inf, tc_flops, dram, math.inf,
                   floor_us, plan.kernel, kernel.registers, smem, kernel.mma, "no fit", note)
    waves = waves_of(blocks, per_sm, gpu)
    resident_warps = min(per_sm, math.ceil(blocks / gpu.sms)) * threads / 32 / 4  # per scheduler
    hide = min(1.0, resident_warps / hw.WARPS_TO_HIDE_LATENCY)
    t_tc = tc_flops / (gpu.bf16_tflops * 1e12 * hw.MMA_EFFICIENCY.get(kernel.mma, hw.MMA_EFFICIENCY["unknown"]))
    t_fp32 = slots / (gpu.issue_rate * hw.ISSUE_EFFICIENCY * hide)
    # The last, partial round of blocks leaves SMs idle: the arithmetic stretches by
    # ceil(w) / w, w = blocks / (SMs x g), g = the co-resident blocks that saturate an SM
    # (enough warps to hide latency; g = blocks_per_sm gives waves). The memory terms
    # do not stretch (a partial round still streams, from fewer SMs).
    saturating = min(per_sm, math.ceil(hw.WARPS_TO_HIDE_LATENCY * 4 / (threads / 32)))
    rounds = blocks / (gpu.sms * saturating)
    quantization = math.ceil(rounds) / rounds
    terms = {"tc+fp32": (t_tc + t_fp32) * quantization, "dram": dram / (gpu.dram_tbs * 1e12 * gpu.dram_efficiency),
             "l2": l2 / (gpu.l2_tbs * 1e12)}
    bound = max(terms, key=terms.get)
    predicted = terms[bound] * 1e6 + hw.LAUNCH_US * plan.launches
    if role == "statistic":  # the loss, reduced by the last block to arrive
        predicted += hw.LAST_BLOCK_TAIL_US
    return Row(case.backend, role, pass_, b, n, d, k, case.dtype, blocks, per_sm, waves, tc_flops, dram, predicted,
               floor_us, plan.kernel, kernel.registers, smem, kernel.mma, bound, note)


def library_gemm(gpu, case: Case, pass_: str, role: str, m: int, n: int, k: int, dtype: str,
                 compulsory_bytes: float) -> Row:
    """A cuBLAS GEMM: flops at a fraction of the peak, or its bytes at the achievable bandwidth."""
    size = BYTES[dtype]
    flops = 2.0 * m * n * k
    dram = (m * k + k * n + m * n) * size
    peak = (gpu.fp32_tflops if dtype == "fp32" else gpu.bf16_tflops) * 1e12
    compute = flops / (peak * hw.LIBRARY_GEMM_EFFICIENCY[dtype])
    memory = dram / (gpu.dram_tbs * 1e12 * gpu.dram_efficiency)
    blocks = math.ceil(m / hw.LIBRARY_GEMM_TILE[0]) * math.ceil(n / hw.LIBRARY_GEMM_TILE[1])
    floor = max(flops / peak, compulsory_bytes / (gpu.dram_tbs * 1e12)) * 1e6
    return Row(case.backend, role, pass_, case.batch, case.N, case.D, case.K, case.dtype, blocks, 1,
               waves_of(blocks, 1, gpu), flops, dram, max(compute, memory) * 1e6 + hw.LAUNCH_US, floor,
               "cublas", bound="tc" if compute >= memory else "dram")


def small_op(gpu, case: Case, pass_: str, role: str, elements: int, dram: float) -> Row:
    """A small torch op (the directions' cast): its bytes, and a launch."""
    blocks = max(1, math.ceil(elements / 1024))
    predicted = dram / (gpu.dram_tbs * 1e12 * gpu.dram_efficiency) * 1e6 + hw.LAUNCH_US
    return Row(case.backend, role, pass_, case.batch, case.N, case.D, case.K, case.dtype, blocks, 1,
               waves_of(blocks, 1, gpu), 0.0, dram, predicted, 0.0, "torch", bound="launch")
