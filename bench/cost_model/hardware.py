"""The machines and the constants of the time model: every number the model uses, in one place.

Sources (leads unless measured): the device notes of this workplace, H200.md and
KINDS.md ("KINDS"), which record a measured 4.3 TB/s device-to-device copy and
769-798 TFLOP/s bf16 on an 8192^3 product on one H200, 132 SMs, 60 MB L2 and a
1980 MHz SM clock under load; NVIDIA's datasheets ("DS") for the H100 SXM and
H200 SXM peaks (dense bf16 ~989 TFLOP/s, FP32 ~67 TFLOP/s, HBM 3.35 / 4.8 TB/s).
The L2 bandwidth is an assumption, scaled from a public H100 PCIe microbenchmark
(chipsandcheese.com, "Nvidia's H100: Funny L2, and Tons of Bandwidth", 2023: about
5.5 TB/s at 114 SMs and 1.755 GHz) to 132 SMs at 1.98 GHz: unverified here. The
efficiencies below are assumptions for the first GPU run to calibrate (--measured).
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Gpu:
    name: str
    sms: int
    clock_ghz: float           # SM clock under load
    bf16_tflops: float         # dense tensor-core peak, bf16/fp16 inputs, fp32 accumulation
    tf32_tflops: float         # dense tensor-core peak, tf32
    dram_tbs: float            # HBM peak
    dram_efficiency: float     # achievable fraction of dram_tbs (measured copy / peak)
    l2_tbs: float              # L2 -> SM bandwidth (assumed)
    l2_mib: int
    source: str

    @property
    def issue_rate(self) -> float:
        """Thread-instructions per second: 4 schedulers x 32 lanes per SM per clock (= FP32 FMA lanes)."""
        return self.sms * 4 * 32 * self.clock_ghz * 1e9

    @property
    def fp32_tflops(self) -> float:
        """FP32 FMA peak (an FMA is 2 flops): ~67 TFLOP/s on both parts."""
        return 2 * self.issue_rate / 1e12


GPUS = {
    "H200": Gpu("H200", sms=132, clock_ghz=1.98, bf16_tflops=989.0, tf32_tflops=494.5, dram_tbs=4.8,
                dram_efficiency=4.3 / 4.8, l2_tbs=7.0, l2_mib=60,
                source="DS peaks; KINDS: 132 SMs, 1980 MHz, 60 MB L2, copy 4.3 TB/s, bf16 GEMM 769-798 TFLOP/s"),
    "H100": Gpu("H100", sms=132, clock_ghz=1.98, bf16_tflops=989.0, tf32_tflops=494.5, dram_tbs=3.35,
                dram_efficiency=0.90, l2_tbs=7.0, l2_mib=50,
                source="DS peaks (H100 SXM); copy efficiency assumed as measured on the H200"),
}

# --- the SM's limits (Hopper, compute capability 9.0) -------------------------------
REGISTERS_PER_SM = 65536
REGISTER_GRANULE = 8            # registers per thread are allocated in multiples of 8 (256 per warp)
SMEM_PER_SM = 228 * 1024        # bytes of shared memory per SM
SMEM_RESERVED_PER_BLOCK = 1024  # the system's reservation per resident block
MAX_BLOCKS_PER_SM = 32
MAX_THREADS_PER_SM = 2048

# --- the element-wise work, in issue slots (thread-instructions) per element p ------
# The accurate sincos (csrc/sigreg_math.h: Cody-Waite reduction in 3 FMAs, two
# degree-3/4 polynomials, quadrant selects) is ~25 instructions, 2 of them
# conversions on the quarter-rate pipe (counted 4 slots each): 32 slots for the pair.
SINCOS_SLOTS = 32
ROTATION_SLOTS = 4              # c' = c c1 - s s1, s' = s c1 + c s1: 2 FMUL + 2 FFMA (the forward's
                                # u = cos - 1 form, u' = u c1 + u1 - s s1, s' = s c1 + (u s1 + s1): 4 FFMA)
LEAN_ROTATION_SLOTS = 6         # the forward's lean tiles: u' = u + (u u1 + u1 - s s1), s' = s + (s u1 + (u s1 + s1))
ACCUMULATE_SLOTS = 2            # forward: 2 FADD into the knot's sums; backward: 2 FFMA into g
FORWARD_EXTRA_SLOTS = 7         # delta * p, knot 0's 0 * p, masking, the per-thread reduction's share,
                                # cos - 1 (FADD, compare, select: the polynomial's own in quadrant 0)
WEIGHT_SLOTS = 2                # with sample weights: the row's select (p = 0 where w = 0) and its multiply
BACKWARD_EXTRA_SLOTS = 6        # delta * p, scale, conversion to the output dtype, the store
STATISTIC_SLOTS = 24            # per (b, k, j) besides the S partial adds: C, S, weights, coef, clip

# --- efficiencies (to be calibrated by the first GPU run: --measured) -------------------
ISSUE_EFFICIENCY = 0.80         # of the issue rate in the element loop (loop control, address math)
WARPS_TO_HIDE_LATENCY = 2       # resident warps per scheduler that hide the 4-cycle FMA latency
MMA_EFFICIENCY = {              # in-kernel projection tile, of the tensor-core peak, by the SASS seen
    "HGMMA": 0.60,              # wgmma (sm_90a) issued by a warpgroup
    "HMMA": 0.40,               # mma.sync: at most ~2/3 of wgmma's rate on Hopper, small tiles
    "unknown": 0.40,            # no disassembler found: assume mma.sync
}
FMA_PROJECTION_SLOTS = 1.25     # per multiply-add of a float32 FMA projection tile (FFMA + its share of loads)
LIBRARY_GEMM_EFFICIENCY = {"bf16": 0.70, "fp16": 0.70, "tf32": 0.70, "fp32": 0.75}  # cuBLAS, of the peak
LIBRARY_GEMM_TILE = (128, 128)  # output tile per CTA, for the blocks/waves columns (1 CTA per SM)
LAUNCH_US = 2.0                 # per kernel: launch and drain, back to back in one stream
# The statistic kernel's loss: after the other blocks, the last to arrive takes an L2
# atomic round trip and sums the blocks' float64 partial losses (B K / 32 of them) alone.
LAST_BLOCK_TAIL_US = 1.0        # assumption, to be checked by the first GPU run
