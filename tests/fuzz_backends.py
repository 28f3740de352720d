"""Differential fuzzing: every backend that can run here against the float64 oracle.

    python tests/fuzz_backends.py --examples 200 --seed 7        # the default backends, 200 cases each
    python tests/fuzz_backends.py --soak 60 --backends cpu       # new cases until 60 minutes have passed
    python tests/fuzz_backends.py --backends cpu --case '{...}'  # replay one case: what a failure prints

A case is a small JSON record (``Case``): shapes (batch dims none to two, ``N``
1-5000, ``D`` 1-600, ``K`` 1-1100, ``knots`` 2-64, ``t_max`` 0.1-10), input
scale 1e-3 to 1e4 and distribution, dtype (fp32 / bf16 / fp16, fp64 where the
backend takes it, x and directions of different precisions), the memory layout
of each input (contiguous, transposed, sliced, expanded with stride 0),
``directions=None`` and ``clip_value`` where ``sigreg`` has them, which inputs
require grad, ``reduction``, sample weights, ``unbiased=True`` (the U-statistic: the
rounding model below carries ``C``'s and ``S``'s errors with its coefficients,
``unbiased_coefficients``, and the rounding of ``r = N / (N - 1)`` where a weighted
size is near 1), and NaN or Inf written into chosen rows. Each
example draws one case; for each backend the case is shrunk (``N``, ``K``,
``D`` halved, largest first) until it fits that backend's budget: the Triton
interpreter and the CUDA emulation are thousands of times slower than the
kernel, so they get small cases of the same kinds.

Checked per case: the value (``reduction`` applied) and the gradient of the
leaf tensors that require it, under a random upstream weight, against the
oracle, ``sigreg_reference`` in float64 on the same rounded inputs (slice by
slice where ``B*N*K*T`` is large). ``clip_value`` is placed between the
oracle's statistics, far enough from each that rounding cannot decide which
slices are clipped. Non-finite entries must sit where the oracle has them;
the finite ones must be within the tolerance.

The tolerance model. Each quantity (the value, each gradient) is compared norm-wise,
``||ours - oracle|| / ||oracle||``, against the largest of three terms, after two
allowances; ``test_fuzz.py`` plants a bug of each kind to show the term still
catches it:
1. SPEC §4's bar: 1e-5 for float32 inputs; 1e-4 for the value and 2e-2 for the
   gradients with 16-bit inputs (gradients come back rounded to 16 bits); 1e-10 for
   float64. (Planted: the value off by 3e-5.)
2. Twice the error of the formula evaluated in float32 by ``sigreg_reference`` on the
   same inputs (upcast): what float32 arithmetic itself loses on this case, e.g. ``x``
   rounded near a huge shift. (Planted: on a case where this term is the tolerance,
   an error ten times the float32 reference's.)
3. Three times the expected error of a float32 evaluation under a rounding model
   (``RoundingModel``), honest for large arguments and ill-conditioned cases: the
   angle ``t_j p`` errs by the rounding of the product ``t_j p`` (``eps |t_j p|``,
   independent per knot), by ``t_j dp`` where ``dp`` is the rounding of the projection
   ``p = x . a``, a length-``D`` float32 dot product (``projection_error``; one error
   per sample, so it adds up over the knots, and its effect on the statistic is
   ``sum_n G_nk dp_nk`` with ``G`` the exact gradient; the recurrence's ``j``-fold rotation
   by the rounded unit angle ``delta p`` adds ``eps |p| / 2`` to ``dp``), and by the random walk of the
   angle-addition recurrence (``eps sqrt(j)`` times the size of ``(cos - 1, sin)``,
   ``min(1, |t_j p|)``: the kernels rotate ``cos - 1``); the gradient coefficients ``G`` may
   be held in the input dtype (SPEC §3): rounded relative to ``G``, and to half a
   subnormal spacing where ``G`` is that small (16-bit ``G`` at small angles). These errors are carried through the
   formulas and the GEMMs and divided by the exact results, so the tolerance widens
   where cancellation makes any float32 result fragile: nearly Gaussian samples
   (``C - phi`` ~ 1/sqrt(N)), one sample or identical rows, shifted data, a long
   product that cancels. At ``rms |x . a|`` ~ 1e3 this allows ~5e-4 on the gradient
   (kernels and float32 reference measure ~1e-4: ``bench/accuracy_envelope.py``).
   Where the angles' error reaches 1, only the non-finite entries are checked
   (counted in the summary). Small angles (small ``t_max`` or scale) get no
   allowance: the kernels sum ``cos - 1`` and form ``C - phi`` from ``phi - 1``, so
   cancellation near ``cos = 1`` costs them nothing. (Planted: angles from a
   projection ten times less precise than float32's; the angle-addition walk with
   its unit rotation off by a few ulps too many; ``C`` formed from sums of ``cos``.)
Allowance A, output rounding: a gradient returned in 16 bits is rounded there, to
within half a subnormal spacing in the subnormal range (relative rounding is in the
bar of term 1); autograd sums the gradient of an expanded input over its copies,
and their roundings with them (identical copies round identically, so the
allowances add: ``copies_per_element``). Each element's error is reduced by its
allowance before the norm. (Planted: a gradient flushed to zero where it is
subnormal.)
Allowance B, overflow: a value whose exact magnitude rounds to infinity in the
output dtype (through the dtype it is computed in: an fp16 gradient of bf16
directions) must be infinite, with the exact value's sign, as a cast gives it (SPEC
§2); one within the tolerance of that threshold may come back finite or infinite.
The op sees an expanded input's copies: where one copy's exact gradient overflows,
autograd's sum of the copies may be infinite however small the exact sum is
(``copies_overflowing``). Elsewhere non-finite entries must sit exactly where the
oracle has them. (Planted:
a gradient clamped to the largest finite value; infinity where the exact value is
half the threshold.)

The CUDA kernels run through the host emulation (``emulated_cuda.py``) by one
adapter, ``cuda_emulated_sigreg``: the only place that knows its API.
"""

import argparse
import dataclasses
import hashlib
import importlib
import importlib.util
import inspect
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
LAYOUTS = ("contiguous", "transposed", "sliced", "expanded")
# Sizes near the kernels' tiles and blocks (16 to 256) and the edges, drawn as often as log-uniform sizes.
EDGE_SIZES = (1, 2, 3, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257)
ORACLE_CHUNK = 1 << 21  # float64 angles per slice chunk of the oracle (16 MiB)


# ----------------------------------------------------------------------------- cases


@dataclasses.dataclass
class Case:
    seed: int
    batch: list
    n: int
    d: int
    k: int  # ignored (K = D) when a_layout is "none"
    knots: int = 17
    t_max: float = 3.0
    scale: float = 1.0
    dist: str = "normal"  # normal | uniform | heavy (log-normal magnitudes) | shifted (mean 3 * scale)
    dtype: str = "float32"
    a_dtype: str = "float32"  # directions are cast to x's dtype by sigreg (mixed precision)
    unit_columns: bool = True
    x_layout: str = "contiguous"
    a_layout: str = "contiguous"  # or "none": directions=None
    grad: str = "x"  # x | directions | both | none
    reduction: str = "mean"
    clip: float | None = None  # quantile of the oracle's statistics where clip_value is placed
    nonfinite: dict | None = None  # {"in": "x"|"directions", "rows": [...], "value": "nan"|"inf"|"-inf"}
    tensor_cores: bool = False  # cuda-emulated, 16-bit inputs: the WMMA path
    weights: str | None = None  # sample weights: "mask" (bool) | "float" (non-negative, some 0) | None
    garbage: bool = False  # NaN and Inf written into the rows of weight 0
    unbiased: bool = False  # the U-statistic (sigreg's unbiased=True); N >= 2 (shrink keeps it)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"))

    @staticmethod
    def from_json(text: str) -> "Case":
        return Case(**json.loads(text))

    @property
    def slices(self) -> int:
        return self.d if self.a_layout == "none" else self.k

    @property
    def batch_size(self) -> int:
        return math.prod(self.batch)


def api_features() -> dict:
    """What ``sigreg`` takes here: ``clip_value`` (its signature), ``directions=None`` (a probe call)."""
    from sigreg_kernels import sigreg

    try:
        sigreg(torch.zeros(1, 1), None, backend="reference")
        no_directions = True
    except (TypeError, ValueError, AttributeError, RuntimeError):
        no_directions = False
    parameters = inspect.signature(sigreg).parameters
    return {"clip_value": "clip_value" in parameters, "no_directions": no_directions,
            "unbiased": "unbiased" in parameters}


def _size(rng: random.Random, high: int) -> int:
    if rng.random() < 0.4:
        return rng.choice([s for s in EDGE_SIZES if s <= high])
    return max(1, min(high, round(math.exp(rng.uniform(0, math.log(high))))))


def draw_case(rng: random.Random, features=None) -> Case:
    """One random case, before it is shrunk to a backend's budget."""
    features = api_features() if features is None else features
    dtype = rng.choice(["float32", "float32", "bfloat16", "float16", "float64"])
    a_dtype = dtype
    if dtype != "float64" and rng.random() < 0.15:
        a_dtype = rng.choice([d for d in ("float32", "bfloat16", "float16") if d != dtype])
    a_layout = rng.choice(LAYOUTS)
    if features["no_directions"] and rng.random() < 0.15:
        a_layout = "none"
    case = Case(
        seed=rng.randrange(2**31),
        batch=[rng.randint(1, 3) for _ in range(rng.choice([0, 0, 1, 2]))],
        n=_size(rng, 5000), d=_size(rng, 600), k=_size(rng, 1100),
        knots=rng.choice([2, 3, 17, 17, 17, rng.randint(2, 64)]),
        t_max=rng.choice([3.0, 3.0, round(math.exp(rng.uniform(math.log(0.1), math.log(10))), 4)]),
        scale=float(f"{math.exp(rng.uniform(math.log(1e-3), math.log(1e4))):.3g}"),
        dist=rng.choice(["normal", "normal", "uniform", "heavy", "shifted"]),
        dtype=dtype, a_dtype=a_dtype, unit_columns=rng.random() < 0.8,
        x_layout=rng.choice(LAYOUTS), a_layout=a_layout,
        grad=rng.choice(["x", "x", "directions", "both", "both", "none"]),
        reduction=rng.choice(["mean", "sum", "none"]),
        tensor_cores=rng.random() < 0.5,
    )
    if features["clip_value"] and rng.random() < 0.25:
        case.clip = round(rng.uniform(0.05, 0.95), 3)
    if features.get("weights", True) and rng.random() < 0.25:
        case.weights = rng.choice(["mask", "float"])
        case.garbage = case.x_layout != "expanded" and rng.random() < 0.5
    if rng.random() < 0.15:
        where = "directions" if a_layout != "none" and rng.random() < 0.2 else "x"
        case.nonfinite = {"in": where, "value": rng.choice(["nan", "inf", "-inf"]),
                          "rows": [rng.random() for _ in range(rng.randint(1, 3))]}
    # From the case's own seed, not rng: the cases drawn before this option are drawn unchanged.
    case.unbiased = features.get("unbiased", True) and case.n >= 2 and random.Random(case.seed).random() < 0.25
    return case


def cost(case: Case) -> float:
    """Rough work of a case: the angles (B N K T) and the products (B N K D)."""
    d = 0 if case.a_layout == "none" else case.d
    return case.batch_size * case.n * case.slices * (case.knots + d + 8)


def shrink(case: Case, budget: float) -> Case:
    """The case with N, K, D (and batch dims) halved, largest first, until it costs at most ``budget``."""
    case = dataclasses.replace(case, batch=list(case.batch))
    while cost(case) > budget:
        sizes = {"n": case.n if case.n >= 3 or not case.unbiased else 1,  # unbiased: two samples at least
                 "k": case.slices if case.a_layout != "none" else 1, "d": case.d}
        if case.batch_size > 1:
            sizes["batch"] = case.batch_size * 8  # kept until N, K, D are down to ~8 times their product
        name = max(sizes, key=sizes.get)
        if sizes[name] <= 1:
            break
        if name == "batch":
            i = max(range(len(case.batch)), key=lambda j: case.batch[j])
            case.batch[i] = (case.batch[i] + 1) // 2
        else:
            setattr(case, name, (getattr(case, name) + 1) // 2)
    return case


# ----------------------------------------------------------------------------- inputs


def _values(gen: torch.Generator, shape, case: Case) -> torch.Tensor:
    v = torch.randn(shape, generator=gen, dtype=torch.float64)
    if case.dist == "uniform":
        v = torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1
    elif case.dist == "heavy":
        v = v * torch.exp(torch.randn(shape, generator=gen, dtype=torch.float64))
    elif case.dist == "shifted":
        v = v + 3
    return v * case.scale


def _layout(gen, base: torch.Tensor, layout: str, expand_dim: int, expand_to: int):
    """(leaf, view): ``view(leaf)`` has ``base``'s values in ``layout``; ``base`` has size 1 at
    ``expand_dim`` for "expanded" (stride 0 after expanding to ``expand_to``)."""
    if layout == "contiguous":
        return base.clone(), lambda t: t
    if layout == "transposed":
        return base.mT.contiguous(), lambda t: t.mT
    if layout == "sliced":  # every other row, columns from 1: a storage offset and two non-unit strides
        rows, cols = base.shape[-2], base.shape[-1]
        leaf = torch.randn(*base.shape[:-2], 2 * rows, cols + 2, generator=gen, dtype=torch.float64)
        leaf[..., 0::2, 1:cols + 1] = base
        return leaf, lambda t: t[..., 0::2, 1:cols + 1]
    shape = list(base.shape)
    shape[expand_dim] = expand_to
    return base.clone(), lambda t: t.expand(shape)


def _place_nonfinite(case: Case, x_base: torch.Tensor, a_base: torch.Tensor) -> None:
    spec = case.nonfinite
    value = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}[spec["value"]]
    if spec["in"] == "x":  # rows (samples) of the flattened batch of the base
        flat = x_base.reshape(-1, x_base.shape[-1])
        for r in spec["rows"]:
            flat[int(r * flat.shape[0]), int(r * 7919) % flat.shape[1]] = value
    else:  # a feature row of the directions
        for r in spec["rows"]:
            a_base[int(r * a_base.shape[0]), :] = value


def make_inputs(case: Case):
    """Float64 leaves (values already rounded to the case's dtypes) and the views that make the inputs."""
    gen = torch.Generator().manual_seed(case.seed)
    dtype, a_dtype = DTYPES[case.dtype], DTYPES[case.a_dtype]
    x_shape = [*case.batch, case.n, case.d]
    # Expanded x: stride 0 along the first batch dim if any, else along the samples (identical rows).
    x_expand = 0 if case.batch else len(x_shape) - 2
    if case.x_layout == "expanded":
        x_shape[x_expand] = 1
    x_base = _values(gen, x_shape, case)
    a_base = None
    if case.a_layout != "none":
        a_shape = [case.d, case.k if case.a_layout != "expanded" else 1]  # stride 0: identical slices
        a_base = torch.randn(a_shape, generator=gen, dtype=torch.float64)
        a_base = a_base / a_base.norm(dim=0).clamp_min(1e-30)
        if not case.unit_columns:
            a_base = a_base * torch.exp(torch.empty(a_shape[1], dtype=torch.float64).uniform_(
                math.log(0.1), math.log(10), generator=gen))
    if case.nonfinite:
        _place_nonfinite(case, x_base, a_base)
    if case.garbage:  # what padding rows hold: anything
        garbage = torch.tensor([math.nan, math.inf, -math.inf, 1e30], dtype=torch.float64)
        masked = sample_weights(case) == 0
        x_base[masked] = garbage[torch.arange(x_base.shape[-1]) % 4]
    finite_max = min(torch.finfo(dtype).max, torch.finfo(a_dtype).max) / 4  # no overflow unless asked
    x_base = x_base.clamp(-finite_max, finite_max).where(x_base.isfinite(), x_base).to(dtype).double()
    x_leaf, x_view = _layout(gen, x_base, case.x_layout, x_expand, case.batch[0] if case.batch else case.n)
    x_leaf = x_leaf.to(dtype).double()
    if a_base is None:
        return (x_leaf, x_view), None
    a_base = a_base.to(a_dtype).to(dtype).double()  # sigreg casts directions to x's dtype: the oracle sees that
    a_leaf, a_view = _layout(gen, a_base, case.a_layout, 1, case.k)
    return (x_leaf, x_view), (a_leaf.to(a_dtype).to(dtype).double(), a_view)


def sample_weights(case: Case) -> torch.Tensor | None:
    """The case's sample weights ``[*B, N]`` (float64; a mask is 0/1): about a quarter of the rows
    0, and one batch index without any weight now and then."""
    if case.weights is None:
        return None
    gen = torch.Generator().manual_seed(case.seed + 2)
    shape = [*case.batch, case.n]
    weights = (torch.rand(shape, generator=gen, dtype=torch.float64) > 0.25).double()
    if case.weights == "float":  # rounded to x's dtype, in which a user passes them: the oracle sees those
        weights = (weights * torch.rand(shape, generator=gen, dtype=torch.float64) * 2).to(DTYPES[case.dtype]).double()
    if case.batch and torch.rand((), generator=gen) < 0.3:
        weights.view(-1, case.n)[0] = 0.0
    return weights


def upstream_weight(case: Case) -> torch.Tensor:
    gen = torch.Generator().manual_seed(case.seed + 1)
    shape = [*case.batch, case.slices] if case.reduction == "none" else []
    return torch.randn(shape, generator=gen, dtype=torch.float64)


# ----------------------------------------------------------------------------- the oracle


def reference_stats(x, a, knots, t_max, dtype, clip_value=None, weights=None, unbiased=False):
    """Per-slice statistics ``[*B, K]`` by ``sigreg_reference`` in ``dtype``, slice chunk by slice chunk
    (the statistic of a slice depends on its column of the projection alone)."""
    from sigreg_kernels import sigreg_reference

    x = x.to(dtype)
    a = None if a is None else a.to(dtype)
    slices = x.shape[-1] if a is None else a.shape[1]
    chunk = max(1, ORACLE_CHUNK // max(1, x[..., 0].numel() * knots))
    parts = []
    for k0 in range(0, slices, chunk):
        k1 = min(slices, k0 + chunk)
        x_part, a_part = (x[..., k0:k1], None) if a is None else (x, a[:, k0:k1])
        parts.append(sigreg_reference(x_part, a_part, knots=knots, t_max=t_max, reduction="none",
                                      clip_value=clip_value, weights=weights, unbiased=unbiased))
    return torch.cat(parts, dim=-1)


def resolve_clip(case: Case, stats: torch.Tensor, margin: float) -> float | None:
    """``clip_value`` for the case, at least ``margin`` away from every statistic of the oracle, so that
    no backend's rounding decides which slices it clips: the middle of a gap between two statistics
    near quantile ``case.clip``, or (no gap is wide enough: equal slices, tiny scales) below or above
    them all."""
    if case.clip is None:
        return None
    finite = stats[stats.isfinite()].flatten().sort().values.tolist()
    if not finite:
        return 1.0
    target = case.clip * (len(finite) - 1)
    gaps = [i for i in range(len(finite) - 1) if finite[i + 1] - finite[i] > 2 * margin]
    if gaps:
        i = min(gaps, key=lambda g: abs(g + 0.5 - target))
        return (finite[i] + finite[i + 1]) / 2
    return finite[0] - 2 * margin if case.clip < 0.5 else finite[-1] + 2 * margin


def reduce(stats, reduction, weight, weights=None):
    """``reduction`` of the per-slice statistics, and the loss ``sum(weight * value)`` to differentiate.
    With sample weights the mean leaves out the batch indices that hold none."""
    mean = stats.mean
    if weights is not None:
        present = (weights.sum(dim=-1) > 0).sum()
        mean = lambda: stats.sum() / (stats.shape[-1] * present).clamp_min(1)  # noqa: E731
    value = {"mean": mean, "sum": stats.sum, "none": lambda: stats}[reduction]()
    return value, (value * weight.to(value.dtype)).sum()


def evaluate(fn, case: Case, inputs, weight, clip_value, device="cpu", dtype=None, views=None):
    """(value, {leaf name: grad}) of ``fn(x, directions) -> per-slice or reduced output``.
    ``views``: a dict that receives the gradients with respect to the views the op sees."""
    (x_leaf, x_view), a_in = inputs
    x_leaf = x_leaf.to(device=device, dtype=dtype or DTYPES[case.dtype]).requires_grad_(case.grad in ("x", "both"))
    leaves = {"x": x_leaf}
    a = None
    if a_in is not None:
        a_leaf, a_view = a_in
        a_leaf = a_leaf.to(device=device, dtype=dtype or DTYPES[case.a_dtype])
        leaves["directions"] = a_leaf.requires_grad_(case.grad in ("directions", "both"))
        a = a_view(a_leaf)
    seen = {"x": x_view(x_leaf), "directions": a}
    value, loss = fn(seen["x"], a, weight.to(device), clip_value)
    wanted = {name: t for name, t in leaves.items() if t.requires_grad}
    grads = {}
    if wanted:
        found = torch.autograd.grad(loss, list(wanted.values()) + [seen[name] for name in wanted], allow_unused=True)
        grads = dict(zip(wanted, found[:len(wanted)]))
        if views is not None:
            views.update({name: None if g is None else g.detach().cpu() for name, g in zip(wanted, found[len(wanted):])})
    return value.detach().cpu(), {k: (None if g is None else g.cpu()) for k, g in grads.items()}


def oracle_fn(case: Case, dtype):
    weights = sample_weights(case)

    def fn(x, a, weight, clip_value):
        stats = reference_stats(x, a, case.knots, case.t_max, dtype, clip_value, weights, case.unbiased)
        return reduce(stats, case.reduction, weight, weights)
    return fn


def compacted_stats(case: Case, inputs) -> torch.Tensor:
    """A mask's second oracle: each batch index's statistics from its unmasked rows alone, in float64."""
    (x_leaf, x_view), a_in = inputs
    x = x_view(x_leaf).detach()
    a = None if a_in is None else a_in[1](a_in[0]).detach()
    mask = sample_weights(case).reshape(-1, case.n) > 0
    flat = x.reshape(-1, case.n, x.shape[-1])
    stats = [reference_stats(flat[b][mask[b]][None], a, case.knots, case.t_max, torch.float64,
                             unbiased=case.unbiased)[0]
             if mask[b].any() else torch.zeros(case.slices, dtype=torch.float64) for b in range(flat.shape[0])]
    return torch.stack(stats).reshape(*case.batch, case.slices)


# ----------------------------------------------------------------------------- backends


def public_api(backend: str):
    """``sigreg_kernels.sigreg`` with ``backend``, as a user calls it."""
    def fn(case: Case, x, a, weight, clip_value):
        from sigreg_kernels import sigreg

        kwargs = dict(knots=case.knots, t_max=case.t_max, reduction=case.reduction, backend=backend)
        if clip_value is not None:
            kwargs["clip_value"] = clip_value
        if case.unbiased:
            kwargs["unbiased"] = True
        weights = sample_weights(case)
        if weights is not None:  # as a user passes them: a bool mask, or float weights in x's dtype
            kwargs["weights"] = (weights > 0 if case.weights == "mask" else weights.to(x.dtype)).to(x.device)
        value = sigreg(x, a, **kwargs)
        return value, (value * weight.to(value.dtype)).sum()
    return fn


_EMULATION = None


def _emulated_kernels():
    """The CUDA kernels built for the host (tests/emulated_cuda.py), once per source version."""
    global _EMULATION
    if _EMULATION is None:
        sys.path.insert(0, str(TESTS))
        import emulated_cuda

        sources = sorted(p for d in (TESTS / "cuda_host_emulation", ROOT / "csrc") for p in d.rglob("*") if p.is_file())
        digest = hashlib.sha256()
        for p in sources + [TESTS / "emulated_cuda.py"]:
            digest.update(p.read_bytes())
        library = Path(tempfile.gettempdir()) / f"sigreg_fuzz_emulation_{digest.hexdigest()[:16]}.so"
        if not library.exists():
            with tempfile.TemporaryDirectory() as build_dir:
                built = emulated_cuda.build(Path(build_dir))
                shutil.copy(built, f"{library}.{os.getpid()}")
                os.replace(f"{library}.{os.getpid()}", library)  # atomic: parallel runs may build it too
        _EMULATION = emulated_cuda.EmulatedKernels(library)
    return _EMULATION


def cuda_emulated_sigreg(case: Case, x, a, weight, clip_value):
    """The ``cuda`` backend's kernels under the host emulation: THE adapter to the emulation's API.

    ``EmulatedKernels.sigreg`` runs ``gpu/fused.py`` (the ``cuda`` backend's
    orchestration) around the emulated kernels on contiguous inputs of one
    dtype; what ``sigreg`` does before (the directions cast to x's dtype) is
    done here. ``tensor_cores``: WMMA products where the kernels compute the
    projection (16-bit inputs; float32 at "highest" precision takes the SGEMM route).
    """
    kernels = _emulated_kernels()
    weights = sample_weights(case)
    value = kernels.sigreg(x, None if a is None else a.to(x.dtype), knots=case.knots, t_max=case.t_max,
                           reduction=case.reduction, tensor_cores=case.tensor_cores, clip_value=clip_value,
                           weights=None if weights is None else weights.to(x.device), unbiased=case.unbiased)
    return value, (value * weight.to(value.dtype)).sum()


@dataclasses.dataclass
class Backend:
    name: str
    fn: object  # (case, x, a, weight, clip_value) -> (value, loss)
    budget: float  # largest cost() of a case for this backend
    dtypes: tuple = ("float32", "bfloat16", "float16")
    device: str = "cpu"
    prepare: object = lambda: None  # builds or imports what the backend needs; raises if it cannot


def _gpu() -> bool:
    return torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"


def backend_table():
    """Every backend this machine can run, by name (None: why not)."""
    from sigreg_kernels import available_backends

    all_dtypes = ("float32", "bfloat16", "float16", "float64")
    table = {"cpu": Backend("cpu", public_api("cpu"), 6e6, all_dtypes) if "cpu" in available_backends("cpu")
             else None,
             "reference": Backend("reference", public_api("reference"), 3e6, all_dtypes)}
    table["triton"] = None
    if importlib.util.find_spec("triton") is not None:  # (importing triton itself takes seconds)
        gpu = _gpu()
        table["triton"] = Backend("triton", public_api("triton"), 6e7 if gpu else 4e4, device="cuda" if gpu else "cpu",
                                  prepare=lambda: importlib.import_module("sigreg_kernels.gpu.triton.ops"))
    table["cuda"] = (Backend("cuda", public_api("cuda"), 6e7, device="cuda")
                     if torch.cuda.is_available() and "cuda" in available_backends("cuda") else None)
    table["cuda-emulated"] = (Backend("cuda-emulated", cuda_emulated_sigreg, 1.5e6, prepare=_emulated_kernels)
                              if shutil.which("g++") else None)
    return table


DEFAULT_BACKENDS = ("cpu", "triton", "cuda", "cuda-emulated")


# ----------------------------------------------------------------------------- comparison


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-300)).item()


def floor(case: Case, quantity: str) -> float:
    """SPEC §4's bar for the value, or for the gradient of leaf ``quantity`` ("x", "directions")."""
    computed = DTYPES[case.dtype]  # sigreg casts the directions to x's dtype
    if computed == torch.float64:
        return 1e-10
    if quantity == "value":
        return 1e-5 if computed == torch.float32 else 1e-4
    returned = DTYPES[case.dtype if quantity == "x" else case.a_dtype]
    return 1e-5 if computed == returned == torch.float32 else 2e-2


def overflow_threshold(dtype: torch.dtype) -> float:
    """The smallest magnitude that rounds to infinity in ``dtype``: its largest finite value plus
    half the spacing there."""
    info = torch.finfo(dtype)
    exponent = math.frexp(info.max)[1] - 1  # max = (2 - eps) * 2^exponent
    try:
        return math.ldexp(2.0 - info.eps / 2, exponent)
    except OverflowError:  # float64: beyond every float64 value
        return math.inf


def compare(name, actual, expected, dtype, tol, problems, via=None, copies=None, copy_overflows=None):
    """Appends to ``problems`` what is wrong with ``actual`` (returned in ``dtype``, computed through
    ``via``); returns err / tol (0 when not checked). ``copies``: per element of ``actual``, how many
    of the op's output elements autograd summed into it (an expanded input's gradient sums its
    copies; 1 elsewhere)."""
    if actual is None or expected is None:
        if (actual is None) != (expected is None):
            problems.append(f"{name}: {'no gradient' if actual is None else 'a gradient where none is expected'}")
        return 0.0
    if actual.shape != expected.shape:
        problems.append(f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}")
        return 0.0
    if actual.dtype != dtype:
        problems.append(f"{name}: dtype {actual.dtype}, expected {dtype}")
    # A value beyond the output's range is infinite there, as a cast gives it (SPEC §2); one within
    # the tolerance of the overflow threshold may come back either way.
    # The leaf's own rounding to dtype; the op's outputs (copy_overflows) to via; without them
    # (no view gradients), the leaf through via.
    threshold = overflow_threshold(dtype) if copy_overflows is not None else min(
        overflow_threshold(d) for d in (dtype, via or dtype))
    magnitude = expected.double().abs()
    bad_actual = ~actual.isfinite()
    bad_expected = ~expected.isfinite() | (magnitude >= threshold * (1 + tol))  # must be non-finite
    may_be_bad = bad_expected | (magnitude >= threshold / (1 + tol))
    same_sign = (actual.double().sign() == expected.double().sign()) | actual.isnan() | ~expected.isfinite()
    may_be_bad &= same_sign | ~bad_actual
    if copy_overflows is not None:
        must, may = copy_overflows
        bad_expected, may_be_bad = bad_expected | must, may_be_bad | may
    mismatch = (bad_actual & ~may_be_bad) | (~bad_actual & bad_expected)
    if mismatch.any():
        extra, missing = (mismatch & bad_actual).sum().item(), (mismatch & bad_expected).sum().item()
        problems.append(f"{name}: {extra} non-finite entries where the oracle is finite, "
                        f"{missing} finite where it is not")
        return math.inf
    keep = ~bad_expected & ~bad_actual
    a, e = actual[keep].double(), expected[keep].double()
    if tol >= 1 or e.numel() == 0:
        return 0.0
    # Rounding to the output dtype (through via's on the way: an fp16 gradient of bf16 directions)
    # errs by up to half a subnormal spacing per element of the op's output, whatever the
    # tolerance; autograd sums an expanded input's copies, and their roundings with them (alike
    # copies round alike: the allowances add).
    subnormal = max(torch.finfo(d).smallest_normal * torch.finfo(d).eps for d in (dtype, via or dtype))
    allowance = 0.5 * subnormal * (1.0 if copies is None else copies[keep].double())
    excess = ((a - e).abs() - allowance).clamp_min(0).norm()
    err = (excess / e.norm().clamp_min(1e-300)).item()
    if not err <= tol:
        problems.append(f"{name}: relative error {err:.2e} > tolerance {tol:.1e}")
    return err / tol


@dataclasses.dataclass
class Result:
    case: Case
    backend: str
    problems: list
    ratio: float  # largest err / tol of the checked quantities
    unchecked: bool  # the angle bound made the tolerance vacuous
    seconds: float
    terms: dict = dataclasses.field(default_factory=dict)  # {quantity: {term: tolerance}} (the docstring's 1-3)

    def reproducer(self) -> str:
        return f"python tests/fuzz_backends.py --backends {self.backend} --case '{self.case.to_json()}'"


def effective_size(case: Case, weights) -> torch.Tensor:
    """``[*B]``: the statistic's N, ``(sum w)^2 / sum w^2`` with weights (0 where there are none)."""
    if weights is None:
        return torch.full(case.batch, float(case.n), dtype=torch.float64)
    total, squares = weights.sum(dim=-1), weights.square().sum(dim=-1)
    return torch.where(total > 0, total.square() / squares.clamp_min(1e-300), 0.0)


def unbiased_coefficients(C, S, phi, size):
    """What ``C - phi`` and ``S`` become in the derivatives of the U-statistic: ``stat_u = N sum_j w_j
    ((C - phi)^2 + S^2) - r sum_j w_j (1 - C^2 - S^2)`` has ``d stat_u / dC = 2 N w_j (C - phi + C / (N - 1))``
    and ``d stat_u / dS = 2 N w_j r S``, the biased forms with these two in place of ``C - phi`` and ``S``."""
    from sigreg_kernels.core.numerics import pair_factor

    r = pair_factor(size).nan_to_num(0.0)[..., None, None]  # 0 where N <= 1
    return (C - phi) + C * (r - 1).clamp_min(0.0), S * r  # r - 1 = 1 / (N - 1)


def ecf_means(x, a, knots, t_max, weights=None):
    """``C, S [*B, K, T]``: the float64 ECF of the projections (slice chunk by slice chunk), weighted
    means with sample weights (rows of weight 0 left out; 0 for a batch index without weight)."""
    from sigreg_kernels import quadrature

    if weights is not None:
        x = torch.where(weights.unsqueeze(-1) > 0, x, 0.0)
        share = (weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-300))[..., None, None]  # [*B, N, 1, 1]

    t, _, _ = quadrature(knots, t_max, dtype=torch.float64)
    slices = x.shape[-1] if a is None else a.shape[1]
    chunk = max(1, ORACLE_CHUNK // max(1, x[..., 0].numel() * knots))
    cos, sin = [], []
    for k0 in range(0, slices, chunk):
        p = x[..., k0:k0 + chunk] if a is None else x @ a[:, k0:k0 + chunk]
        angles = p.unsqueeze(-1) * t  # [*B, N, k, T]
        if weights is None:
            cos.append(angles.cos().mean(dim=-3))
            sin.append(angles.sin().mean(dim=-3))
        else:
            cos.append((angles.cos() * share).sum(dim=-3))
            sin.append((angles.sin() * share).sum(dim=-3))
    return torch.cat(cos, dim=-2), torch.cat(sin, dim=-2)


def slice_derivatives(x, a, C, S, knots, t_max, weights=None, unbiased_size=None):
    """``G = d stat_k / d P_nk`` (SPEC §1) and ``H = dG / dP_nk``, ``[*B, N, K]`` in float64
    (slice chunk by slice chunk); NaN and Inf count as 0. Sample weights: both times
    ``w_n sum w / sum w^2`` (the statistic's N over the means' sum w). ``unbiased_size`` (the
    statistic's N, ``[*B]``): those of the U-statistic (``unbiased_coefficients``)."""
    from sigreg_kernels import quadrature

    t, phi, w = quadrature(knots, t_max, dtype=torch.float64)
    c = 2 * w * t
    if unbiased_size is not None:  # C - phi and S as the U-statistic weighs them; phi then is 0
        C, S = unbiased_coefficients(C, S, phi, unbiased_size)
        phi = torch.zeros_like(phi)
    slices = x.shape[-1] if a is None else a.shape[1]
    chunk = max(1, ORACLE_CHUNK // max(1, x[..., 0].numel() * knots))
    g, h = [], []
    for k0 in range(0, slices, chunk):
        p = x[..., k0:k0 + chunk] if a is None else x @ a[:, k0:k0 + chunk]
        angles = p.unsqueeze(-1) * t  # [*B, N, k, T]
        cos, sin = angles.cos(), angles.sin()
        dc = (C[..., k0:k0 + chunk, :] - phi).nan_to_num(0.0).unsqueeze(-3)
        s = S[..., k0:k0 + chunk, :].nan_to_num(0.0).unsqueeze(-3)
        g.append(((s * cos - dc * sin) * c).sum(dim=-1))
        h.append(((-s * sin - dc * cos) * (c * t)).sum(dim=-1))
    g, h = torch.cat(g, dim=-1).nan_to_num(0.0), torch.cat(h, dim=-1).nan_to_num(0.0)
    if weights is not None:
        row = weights * weights.sum(dim=-1, keepdim=True) / weights.square().sum(dim=-1, keepdim=True).clamp_min(1e-300)
        g, h = g * row.unsqueeze(-1), h * row.unsqueeze(-1)
    return g, h


class RoundingModel:
    """Expected (rms) error of a float32 (float64) evaluation of the formula, from float64 quantities.

    The angle ``t_j p`` at knot ``j`` errs by about ``eps * t_j * rms(p)`` (the rounding
    of the product ``t_j p``) and by ``t_j dp``, ``dp`` the rounding of the projection
    ``p = x . a`` itself (``projection_error``: largest where the product cancels); the
    angle-addition recurrence adds ``eps * sqrt(j)`` (a random walk of ``j`` steps) times the
    size of what it rotates, ``(cos - 1, sin)``, about ``min(1, |t_j p|)``.
    The ECF means ``C``, ``S`` average the angles' errors over the ``N`` samples (not
    when the rows are copies of one), not the walk's (alike angles drift alike). The
    rounding of ``t_j p`` is independent from knot to knot; ``dp`` is one error per
    sample, shared by all its knots, so it adds up linearly over the knots.
    ``G = dloss/dP = s_k sum_j c_j [S cos - (C - phi) sin]``, ``c_j = 2 w_j t_j`` (SPEC §1),
    errs per element through cos and sin, through ``C`` and ``S``, and by ``u`` (unit
    roundoff of the input dtype, in which SPEC §3 lets a backend hold ``G`` for its
    GEMMs). Independent errors add in quadrature through the GEMMs (``G A^T``, ``x^T G``)
    and over the slices of the reduced value, alike slices (expanded directions or
    batch) linearly; divided by the exact results, the estimate widens where
    cancellation makes the float32 result fragile: ``C - phi`` ~ 1/sqrt(N) (nearly
    Gaussian samples), ``G``'s own terms cancelling (one sample, identical rows),
    ``x^T G`` cancelling (shifted data). ``run_case`` allows three times this estimate.
    (Small ``t |p|`` is not among them: the kernels sum ``cos - 1``, whose rounding is
    relative to ``cos - 1``, and form ``C - phi`` from ``phi - 1``.)
    """

    def __init__(self, case: Case, inputs, weight, C, S):
        from sigreg_kernels import quadrature
        from sigreg_kernels.core.numerics import pair_factor

        self.case, self.inputs = case, inputs
        (x_leaf, x_view), a_in = inputs
        self.weights = sample_weights(case)
        self.x = x_view(x_leaf).nan_to_num(0.0, 0.0, 0.0)
        if self.weights is not None:  # rows of weight 0 (and their garbage) count for nothing
            self.x = torch.where(self.weights.unsqueeze(-1) > 0, self.x, 0.0)
        self.a = None if a_in is None else a_in[1](a_in[0]).nan_to_num(0.0, 0.0, 0.0)
        p = self.x if self.a is None else self.x @ self.a
        eps = torch.finfo(torch.float64 if case.dtype == "float64" else torch.float32).eps
        t, phi, w = quadrature(case.knots, case.t_max, dtype=torch.float64)
        self.t, self.w = t, w
        rounding = eps * t * p.square().mean().sqrt()  # [T], independent over knots and samples
        # The recurrence rounds (cos - 1, sin) relative to their size, ~min(1, |t_j p|) (alike for alike angles).
        walk = eps * torch.arange(case.knots).sqrt() * (t * p.square().mean().sqrt()).clamp(max=1.0)  # [T]
        # One error per sample and slice, the same at every knot: the rounding of p = x . a, and that
        # of the unit angle delta p that the recurrence rotates by j times (t_j p errs by j times it).
        self.dp = (self.projection_error(eps / 2).square() + (eps / 2 * (self.x if self.a is None else
                                                                          self.x @ self.a)).square()).sqrt()
        projection = t * self.dp.square().mean().sqrt()  # [T]
        self.e = (rounding.square() + walk.square() + projection.square()).sqrt()  # all of it, per value
        self.copies = case.x_layout == "expanded" and not case.batch  # every row the same sample
        self.size = effective_size(case, self.weights)  # [*B], the statistic's N
        averaged = 1 if self.copies else max(1.0, self.size.min().item()) if self.size.numel() else case.n
        self.e_values = (rounding.square() + walk.square()).sqrt()  # per value, the parts independent over knots
        self.e_means = (rounding.square() / averaged + walk.square()).sqrt()  # of C and S
        self.e_means_linear = projection / averaged ** 0.5  # dp through C and S: summed over knots
        # dp through each value: d stat / dp = G and dG / dp = H, exactly (slice_derivatives).
        unbiased_size = self.size if case.unbiased else None
        self.g, self.h = slice_derivatives(self.x, self.a, C, S, case.knots, case.t_max, self.weights, unbiased_size)
        self.u = torch.finfo(DTYPES[case.dtype]).eps / 2
        self.subnormal = torch.finfo(DTYPES[case.dtype]).smallest_normal * torch.finfo(DTYPES[case.dtype]).eps
        # The coefficients of C's and S's errors in the statistic (times 2 N w_j) and in G (times c_j).
        self.dc, self.s = (C - phi).nan_to_num(0.0), S.nan_to_num(0.0)  # [*B, K, T]
        self.mean_gain, self.size_error = 1.0, torch.zeros_like(self.size)
        if case.unbiased:
            dc, s = unbiased_coefficients(C, S, phi, self.size)
            self.dc, self.s = dc.nan_to_num(0.0), s.nan_to_num(0.0)
            r = pair_factor(self.size).nan_to_num(0.0)  # [*B]
            self.mean_gain = r.max().item() if self.size.numel() else 1.0
            if self.weights is not None:
                # The effective size (sum w)^2 / sum w^2 from float32 sums of N weights errs by about
                # eps (2 + sqrt(N)) relative; r = N / (N - 1) by that over N - 1 (= r - 1), relative.
                relative = (eps if case.dtype == "float64" else torch.finfo(torch.float32).eps) * (2 + case.n ** 0.5)
                self.size_error = relative * (r - 1).clamp_min(0.0)
                # r's error times the spread sum_j w_j (1 - C^2 - S^2) it multiplies, [*B, K]
                spread = ((1 - C.square() - S.square()) @ w).abs().nan_to_num(0.0)
                self.r_error = spread * (self.size_error * r)[..., None]
        self.weight = weight

    def projection_error(self, unit_roundoff: float) -> torch.Tensor:
        """Expected (rms) rounding error of each ``p = x . a``, a dot product of length ``D``
        summed in the accumulation dtype, in whatever order the backend sums it.

        A sequential sum rounds each partial sum ``S_d``: its error is about ``u sqrt(sum_d
        S_d^2)``; in expectation over the order of the terms, ``sum_d S_d^2 ~ D (sum_d (x_d a_d)^2
        / 2 + p^2 / 3)`` (a random walk of the terms that drifts to ``p``). Blocked and pairwise
        sums (GEMMs, tensor cores) err less. Without directions there is no product.
        """
        if self.a is None:
            return torch.zeros_like(self.x)
        terms = self.x.square() @ self.a.square()  # sum_d (x_d a_d)^2
        p = self.x @ self.a
        return unit_roundoff * (self.x.shape[-1] * (terms / 2 + p.square() / 3)).sqrt()

    def value(self, stats, kept) -> float:
        """Relative error of the value: ``stat_k`` errs by ``2 N sum_j w_j ((C - phi) dC + S dS)``,
        and by ``sum_n G_nk dp_nk`` through the projection's rounding."""
        size = (self.dc.square() + self.s.square())  # [*B, K, T]
        independent = (2 * self.size[..., None]) ** 2 * (size @ (self.w * self.e_means).square())
        if self.copies:  # one sample's error, N times
            projection = (self.g.sum(dim=-2) * self.dp[..., 0, :]).square()
        else:
            projection = (self.g * self.dp).square().sum(dim=-2)
        rms = (independent + projection).sqrt()
        # Weighted U-statistic: the rounding of r = N / (N - 1), shared by a batch index's slices.
        r_error = torch.where(kept, getattr(self, "r_error", torch.zeros_like(rms)), 0.0)
        rms, exact = torch.where(kept, rms, 0.0), torch.where(kept, stats, 0.0).nan_to_num(0.0)
        if self.case.reduction == "none":
            return ((rms.norm() + r_error.norm()) / exact.norm().clamp_min(1e-300)).item()
        # Copies of one slice err alike: their errors add (equal directions up to sign, as expanded
        # ones or a single feature give them; x expanded: the first batch dim), distinct slices'
        # in quadrature.
        if self.a is not None:
            _, group = torch.unique(self.a.abs().mT, dim=0, return_inverse=True)
            rms = torch.zeros(*rms.shape[:-1], int(group.max()) + 1, dtype=rms.dtype).index_add_(-1, group, rms)
        if self.case.x_layout == "expanded" and self.case.batch:
            rms = rms.sum(dim=0)
        return ((rms.norm() + r_error.sum()) / exact.sum().abs().clamp_min(1e-300)).item()

    def gradients(self, kept, truth: dict) -> dict:
        """Relative error of the gradient of each leaf in ``truth`` ({name: exact gradient})."""
        case, c = self.case, 2 * self.w * self.t  # d stat / d P = sum_j c_j [S cos - (C - phi) sin]
        factor = 1.0 / kept.numel() if case.reduction == "mean" else 1.0
        scale = (factor * self.weight.abs() * kept).nan_to_num(0.0)  # |s_k|, [*B, K]
        size = self.dc.square() + self.s.square()
        through_values = ((size @ (c * self.e_values).square()).unsqueeze(-2)
                          + (self.h * self.dp).square()).sqrt()  # [*B, N, K]
        through_means = (2 * (c * self.e_means).square().sum() + 2 * (c * self.e_means_linear).sum().square()).sqrt()
        through_means = through_means * self.mean_gain  # the U-statistic weighs C's and S's errors by r
        relative = self.u + self.size_error[..., None, None]  # and its r's rounding, relative to G
        g_rms = scale.unsqueeze(-2) * (through_values + through_means + relative * self.g.abs())  # [*B, N, K]
        # G rounded to the input dtype for the GEMMs (SPEC §3): relative to G, and to half a subnormal
        # spacing where G is that small (16-bit G of small angles or a large batch).
        g_rms = g_rms + (scale.unsqueeze(-2) > 0) * self.subnormal / 2
        rms = {}
        # Through the GEMMs: quadrature over independent terms, linearly over copies of one slice
        # (expanded directions) or of one sample (expanded x), which err alike.
        if "x" in truth:  # G A^T, over the slices
            if self.a is None:
                rms["x"] = g_rms
            elif self.case.a_layout == "expanded":
                rms["x"] = g_rms @ self.a.mT.abs()
            else:
                rms["x"] = (g_rms.square() @ self.a.mT.square()).sqrt()
        if "directions" in truth:  # x^T G, over the samples and batch indices
            if self.copies:
                rms["directions"] = torch.einsum("...nd,...nk->dk", self.x.abs(), g_rms)
            else:
                rms["directions"] = torch.einsum("...nd,...nk->dk", self.x.square(), g_rms.square()).sqrt()
        result = {}
        for name, bound in rms.items():
            leaf, view = self.inputs[0] if name == "x" else self.inputs[1]
            # Through the view's adjoint (an expanded input's gradient sums its copies), as autograd does.
            leaf = leaf.detach().clone().requires_grad_()
            (leaf_rms,) = torch.autograd.grad(view(leaf), leaf, grad_outputs=bound)
            # Relative to what compare() checks: the elements that do not overflow the returned dtype
            # (an overflowing one, checked for being infinite, must not inflate the norm the bound is
            # relative to: fp16 gradients of a huge scale, most of them beyond 65504).
            exact = truth[name].nan_to_num(0.0)
            returned = DTYPES[self.case.dtype if name == "x" else self.case.a_dtype]
            inside = exact.abs() < min(overflow_threshold(returned), overflow_threshold(DTYPES[self.case.dtype]))
            result[name] = (leaf_rms[inside].norm() / exact[inside].norm().clamp_min(1e-300)).item()
        return result


def copies_overflowing(inputs, name: str, view_grad, tol: float, dtype):
    """Per element of leaf ``name``, ``(must, may)``: whether an element of the view the op sees
    (the leaf itself, or a copy of an expanded input) has an exact gradient beyond ``dtype``'s
    overflow threshold by more than the tolerance, or within it. The op returns that gradient in
    ``dtype`` (the dtype it computes in), infinite where it overflows (SPEC §2); autograd then sums
    the copies (in the leaf's dtype), infinity with them, however small the exact sum is."""
    if view_grad is None:
        return None
    leaf, view = inputs[0] if name == "x" else inputs[1]
    def any_copy(condition):
        target = torch.zeros_like(leaf, requires_grad=True)
        (count,) = torch.autograd.grad(view(target), target, grad_outputs=condition.double())
        return count > 0

    magnitude, threshold = view_grad.double().abs(), overflow_threshold(dtype)
    return any_copy(magnitude >= threshold * (1 + tol)), any_copy(magnitude >= threshold / (1 + tol))


def copies_per_element(inputs, name: str) -> torch.Tensor:
    """Per element of leaf ``name``, how many elements of the view the op sees it stands for."""
    leaf, view = inputs[0] if name == "x" else inputs[1]
    leaf = torch.zeros_like(leaf, requires_grad=True)
    (copies,) = torch.autograd.grad(view(leaf), leaf, grad_outputs=torch.ones_like(view(leaf)))
    return copies


def run_case(case: Case, backend: Backend) -> Result:
    """One case on one backend, compared with the oracle."""
    from sigreg_kernels import quadrature
    from sigreg_kernels.core.numerics import pair_factor

    start = time.perf_counter()
    inputs = make_inputs(case)
    weight = upstream_weight(case)
    with torch.no_grad():
        x = inputs[0][1](inputs[0][0])
        a = None if inputs[1] is None else inputs[1][1](inputs[1][0])
        weights = sample_weights(case)
        C, S = ecf_means(x, a, case.knots, case.t_max, weights)
        _, phi, w = quadrature(case.knots, case.t_max, dtype=torch.float64)
        size = effective_size(case, weights)
        stats = ((C - phi).square() + S.square()) @ w * size[..., None]
        if case.unbiased:  # minus r sum_j w_j (1 - C^2 - S^2): the U-statistic
            stats = stats - pair_factor(size)[..., None] * ((1 - C.square() - S.square()) @ w)
    # clip_value ten value tolerances (before clipping) away from every statistic.
    model = RoundingModel(case, inputs, weight, C, S)
    finite = stats[stats.isfinite()]
    value_bound = 3 * model.value(stats, stats.isfinite())
    margin = 10 * max(floor(case, "value"), value_bound) * (finite.abs().max().item() if finite.numel() else 0.0)
    clip_value = resolve_clip(case, stats, margin)
    truth_views = {}
    truth = evaluate(oracle_fn(case, torch.float64), case, inputs, weight, clip_value, dtype=torch.float64,
                     views=truth_views)
    try:
        ours = evaluate(lambda x, a, w, c: backend.fn(case, x, a, w, c), case, inputs, weight, clip_value,
                        device=backend.device)
    except Exception as error:  # noqa: BLE001 - any exception on a valid case is a failure to report
        message = str(error).strip().splitlines()
        return Result(case, backend.name, [f"raised {type(error).__name__}: {message[0] if message else ''}"],
                      math.inf, False, time.perf_counter() - start)
    # Tolerances (see the module's docstring): SPEC's floor, twice the float32 reference's error, the model.
    fp32 = truth if case.dtype == "float64" else evaluate(oracle_fn(case, torch.float32), case, inputs, weight,
                                                          clip_value, dtype=torch.float32)
    kept = stats.isfinite() & (True if clip_value is None else stats >= clip_value)
    value_bound = 3 * model.value(stats, kept)
    grad_bounds = {name: 3 * bound for name, bound in model.gradients(kept, truth[1]).items()}

    terms = {}

    def tolerance(name, ours32, exact, bound):
        terms[name] = {"floor": floor(case, name),
                       "reference": 2 * relative_error(ours32.nan_to_num(), exact.nan_to_num()), "model": bound}
        return max(terms[name].values())

    problems, ratios = [], []
    value_dtype = torch.float64 if case.dtype == "float64" else torch.float32
    ratios.append(compare("value", ours[0], truth[0], value_dtype, tolerance("value", fp32[0], truth[0], value_bound),
                          problems))
    if case.weights == "mask" and case.reduction == "none" and clip_value is None:
        # The second oracle: the statistics of the compacted batch (each batch index without its masked rows).
        compacted = compacted_stats(case, inputs)
        ratios.append(compare("value (compacted batch)", ours[0], compacted, value_dtype,
                              max(terms["value"].values()), problems))
    for name, expected in truth[1].items():
        tol = tolerance(name, fp32[1][name], expected, grad_bounds[name])
        grad_dtype = DTYPES[case.dtype if name == "x" else case.a_dtype]
        ratios.append(compare(f"grad_{name}", ours[1].get(name), expected, grad_dtype, tol, problems,
                              via=DTYPES[case.dtype], copies=copies_per_element(inputs, name),
                              copy_overflows=copies_overflowing(inputs, name, truth_views.get(name), tol,
                                                               DTYPES[case.dtype])))
    return Result(case, backend.name, problems, max(ratios), model.e[-1].item() >= 1, time.perf_counter() - start,
                  terms)


# ----------------------------------------------------------------------------- the driver


def case_for(case: Case, backend: Backend) -> Case | None:
    """The case as ``backend`` runs it (shrunk to its budget, dtype it takes), or None."""
    if case.dtype not in backend.dtypes:
        if case.dtype != "float64":
            return None
        case = dataclasses.replace(case, dtype="float32", a_dtype="float32")
    return shrink(case, backend.budget)


def _print(line):
    print(line, flush=True)


def fuzz(backends, seed, examples=None, minutes=None, out=_print, features=None):
    """Runs cases until ``examples`` or ``minutes`` are done; returns the failed Results."""
    start = time.perf_counter()
    features = api_features() if features is None else features
    failures, ready = [], []
    for backend in backends:
        try:
            backend.prepare()
            ready.append(backend)
        except Exception as error:  # noqa: BLE001 - reported once, as the failure it is
            failures.append(Result(None, backend.name, [f"set-up failed: {error}"], math.inf, False, 0.0))
            out(f"FAIL {backend.name}: set-up failed, not run: {type(error).__name__}: {error}")
    backends = ready
    stats = {b.name: dict(cases=0, unchecked=0, seconds=0.0, worst=0.0) for b in backends}
    index, last_status = 0, time.perf_counter()
    while (examples is None or index < examples) and (minutes is None or time.perf_counter() - start < 60 * minutes):
        drawn = draw_case(random.Random(f"{seed}:{index}"), features)
        for backend in backends:
            case = case_for(drawn, backend)
            if case is None:
                continue
            result = run_case(case, backend)
            s = stats[backend.name]
            s["cases"] += 1
            s["unchecked"] += result.unchecked
            s["seconds"] += result.seconds
            if result.problems:
                failures.append(result)
                out(f"FAIL {backend.name} [{'; '.join(result.problems)}]  reproduce: {result.reproducer()}")
            else:
                s["worst"] = max(s["worst"], result.ratio)
        index += 1
        if minutes is not None and time.perf_counter() - last_status > 60:  # a soak run says it is alive
            last_status = time.perf_counter()
            out(f"... {index} examples, {len(failures)} failures, {(last_status - start) / 60:.0f} of {minutes:g} min")
    out(f"{index} examples, seed {seed}, {time.perf_counter() - start:.0f} s:")
    for name, s in stats.items():
        out(f"  {name:14s} {s['cases']:5d} cases, {s['seconds']:6.1f} s, largest passing error / tolerance "
            f"{s['worst']:.2f}, too large to check (delta >= 1: non-finite entries only) {s['unchecked']}")
    out(f"{len(failures)} failures")
    return failures


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--examples", type=int, default=100, help="cases to draw (each runs on every backend)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--soak", type=float, metavar="MINUTES", help="draw cases until MINUTES have passed")
    p.add_argument("--backends", default=",".join(DEFAULT_BACKENDS),
                   help=f"comma-separated, of: cpu, triton, cuda, cuda-emulated, reference "
                        f"(default: those of {', '.join(DEFAULT_BACKENDS)} this machine can run)")
    p.add_argument("--case", help="replay one case (JSON, as a failure prints it)")
    p.add_argument("--budget-scale", type=float, default=1.0, help="multiply every backend's size budget")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    # NaN and Inf inputs are part of the cases: numpy's warnings about them (Triton's interpreter) are noise.
    warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"triton\.")
    # The Triton kernels run on CPU tensors under the interpreter, chosen at the first import of
    # sigreg_kernels.gpu.triton.ops: set it before anything imports it (without a GPU).
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    table = backend_table()
    names = [n.strip() for n in args.backends.split(",") if n.strip()]
    unknown = [n for n in names if n not in table]
    if unknown:
        raise SystemExit(f"unknown backend(s) {unknown}: choose from {sorted(table)}")
    explicit = args.backends != ",".join(DEFAULT_BACKENDS)
    missing = [n for n in names if table[n] is None]
    if missing and explicit:
        raise SystemExit(f"backend(s) {missing} cannot run on this machine")
    backends = [table[n] for n in names if table[n] is not None]
    for b in backends:
        b.budget *= args.budget_scale
    if args.case:
        case = Case.from_json(args.case)
        failed = False
        for backend in backends:
            result = run_case(case, backend)
            print(f"{backend.name}: {'; '.join(result.problems) or 'ok'} (error / tolerance {result.ratio:.2f})")
            failed |= bool(result.problems)
        return int(failed)
    failures = fuzz(backends, args.seed, examples=None if args.soak else args.examples, minutes=args.soak)
    return int(bool(failures))


if __name__ == "__main__":
    sys.exit(main())
