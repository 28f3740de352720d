"""What the swap does to a LeJEPA training step: SIGReg by the reference and by the fused op.

    python bench/bench_step.py --device cpu --quick    # 2 batch sizes x K in {256, 1024, 4096}, 1 thread; ~1 min
    python bench/bench_step.py --device cpu            # larger batches, more timed steps
    python bench/bench_step.py --device cuda --quick   # a wider ViT, bf16 autocast

One step is the pretraining script's (python/pretrain_vit.py): ``V`` views of each
image through its ViT encoder and MLP projector (python/vit.py), the invariance
term plus ``lambda`` x SIGReg of the ``(V, B, D)`` projections (one test per view),
the online probe's cross-entropy on detached features, backward, one AdamW step.
The images are random tensors of the views' size (augmentation is not timed).

SIGReg is computed by
- ``reference``: the published formula in plain PyTorch (``sigreg_reference``, the
  ``N x K x T`` tensors in memory), with the directions ``SIGReg`` draws;
- each fused backend built for the device (``cpu``; ``cuda``, ``triton``): ``SIGReg``.

Per row: the step's median time, SIGReg's share of it (SIGReg's own forward and
backward on a tensor of the projections' shape, timed alone, over the step time),
and the step's peak memory above what was live before it (CPU: the resident
high-water mark, reset before the step, of a second process where large
allocations are mapped so that freed memory leaves; GPU: torch's allocator peak).
Printed as a table, appended to a CSV (default ``bench/results/step-<device>-<date>.csv``).

``--overhead`` (included in ``--quick``) adds the per-call cost of SIGReg forward +
backward at a tiny shape, where the arithmetic is negligible: the Python and
dispatch overhead of each entry point against the reference.
"""

import argparse
import csv
import datetime
import json
import os
import platform
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "python"))
sys.path.insert(0, ROOT)
from vit import Projector, ViT  # noqa: E402

import sigreg_kernels  # noqa: E402
from sigreg_kernels import SIGReg, available_backends, sigreg, sigreg_reference  # noqa: E402
from sigreg_kernels.lejepa import EppsPulley, SlicingUnivariateTest  # noqa: E402

SLICES = (256, 1024, 4096)
# The model at a stated size: the pretraining script's defaults on CPU (16 px digits, width 128,
# 4 blocks); on GPU a ViT-S-like width and depth on 32 px views (65 tokens).
MODELS = {
    "cpu": dict(image_size=16, patch_size=4, channels=1, dim=128, depth=4, heads=4, mlp_ratio=2.0,
                proj_hidden=512, proj_dim=64),
    "cuda": dict(image_size=32, patch_size=4, channels=3, dim=384, depth=12, heads=6, mlp_ratio=4.0,
                 proj_hidden=2048, proj_dim=128),
}
VIEWS, LAMBDA, CLASSES = 4, 2.0, 10
# (batch sizes, timed steps) per device and mode.
RUNS = {("cpu", True): ((16, 64), 5), ("cpu", False): ((64, 256), 10),
        ("cuda", True): ((128, 512), 10), ("cuda", False): ((256, 1024), 30)}


class Net(nn.Module):
    """The pretraining script's LeJEPANet: encoder, projector, and the online probe on detached features."""

    def __init__(self, cfg):
        super().__init__()
        self.encoder = ViT(cfg["image_size"], cfg["patch_size"], cfg["channels"], cfg["dim"], cfg["depth"],
                           cfg["heads"], cfg["mlp_ratio"])
        self.projector = Projector(cfg["dim"], cfg["proj_hidden"], cfg["proj_dim"])
        self.probe = nn.Linear(cfg["dim"], CLASSES)

    def forward(self, images):
        emb = self.encoder(images)
        return self.projector(emb), self.probe(emb.detach())


class ReferenceSIGReg(SIGReg):
    """The directions SIGReg draws, the statistic by the published formula in plain PyTorch."""

    def forward(self, x):
        directions = self.next_directions(x, self.num_slices)
        return sigreg_reference(x, directions.to(x.dtype), knots=self.knots, t_max=self.t_max)


def make_sigreg(provider, slices):
    if provider == "reference":
        return ReferenceSIGReg(num_slices=slices)
    return SIGReg(num_slices=slices, backend=provider)


def lejepa_step(net, opt, sigreg_module, images, labels, batch, device):
    """The pretraining script's step (lejepa_loss + probe), then backward and AdamW."""
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        proj, logits = net(images)
        proj = proj.view(VIEWS, batch, -1)
        proj32 = proj.float()
        invariance = (proj32 - proj32.mean(0)).square().sum(-1).mean()
        loss = invariance + LAMBDA * sigreg_module(proj) + F.cross_entropy(logits.float(), labels)
    loss.backward()
    opt.step()


def synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, device, repeats, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def resident_high_water_mib(fn):
    """Peak resident memory of this process during ``fn()`` above what was resident before it (Linux)."""

    def read(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

    base = read("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current resident size
    fn()
    return (read("VmHWM") - base) / 2**20


def memory_pass(device, cfg, configs):
    """CPU peak memory of one step per (batch, K, provider), in this fresh process (see cpu_peak_memory)."""
    results = []
    for batch in sorted({c[0] for c in configs}):
        case = StepCase(cfg, batch, device)
        case.step_fn(make_sigreg("reference", SLICES[0]))()  # the optimizer's state, allocated once
        for _, slices, provider in [c for c in configs if c[0] == batch]:
            step = case.step_fn(make_sigreg(provider, slices))
            results.append([batch, slices, provider, round(resident_high_water_mib(step), 1)])
    print(json.dumps(results))


def cpu_peak_memory(args, configs):
    """``{(batch, K, provider): MiB}`` measured in a fresh process where glibc maps every allocation
    above 64 KiB, so that freed tensors leave the resident set and its high-water mark is the peak of
    live memory (as bench/memory_probe.py does). That slows allocation down: the timings are taken here,
    without it. Empty where the measurement is not possible."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
    command = [sys.executable, os.path.abspath(__file__), "--device", args.device, "--threads",
               str(torch.get_num_threads()), "--memory-pass", json.dumps(configs)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        print(f"# peak memory not measured: {result.stderr.strip().splitlines()[-1:]}", flush=True)
        return {}
    return {(b, k, p): mib for b, k, p, mib in json.loads(result.stdout.strip().splitlines()[-1])}


def cuda_peak_memory_mib(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def sigreg_alone_ms(sigreg_module, batch, dim, device, repeats):
    """SIGReg's forward + backward on a tensor of the projections' shape, as in the step."""
    proj = torch.randn(VIEWS, batch, dim, device=device, requires_grad=True)

    def run():
        proj.grad = None
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = LAMBDA * sigreg_module(proj)
        loss.backward()

    return median_ms(run, device, repeats)


class StepCase:
    """One batch size: the model, its optimizer and the batch, shared by the rows of that batch size."""

    def __init__(self, cfg, batch, device):
        torch.manual_seed(0)
        self.batch, self.device = batch, device
        self.net = Net(cfg).to(device)
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=1e-4)
        self.images = torch.randn(VIEWS * batch, cfg["channels"], cfg["image_size"], cfg["image_size"],
                                  device=device)
        self.labels = torch.randint(0, CLASSES, (VIEWS * batch,), device=device)

    def step_fn(self, sigreg_module):
        return lambda: lejepa_step(self.net, self.opt, sigreg_module, self.images, self.labels, self.batch,
                                   self.device)


CSV_FIELDS = ["device", "date", "version", "threads", "batch", "views", "D", "K", "provider", "step_ms",
              "sigreg_ms", "sigreg_share", "peak_mib", "speedup_vs_reference", "error"]


def step_rows(args, device, cfg, providers, writer):
    """Times every (batch, K, provider), then (CPU) measures their peak memory in a second pass."""
    batches, steps = RUNS[device, args.quick]
    print(f"# model: ViT {cfg['image_size']} px / patch {cfg['patch_size']}, width {cfg['dim']}, depth "
          f"{cfg['depth']}, {cfg['heads']} heads, MLP x{cfg['mlp_ratio']}; projector {cfg['proj_hidden']} -> "
          f"D = {cfg['proj_dim']}; V = {VIEWS} views, lambda = {LAMBDA}; "
          f"{'bf16 autocast' if device == 'cuda' else 'float32'}; median of {steps} steps", flush=True)
    cases = {batch: StepCase(cfg, batch, device) for batch in batches}
    rows = []
    for batch in batches:
        for slices in SLICES:
            for provider in providers:
                row = dict(device=device, date=args.date, version=sigreg_kernels.__version__,
                           threads=torch.get_num_threads() if device == "cpu" else None, batch=batch, views=VIEWS,
                           D=cfg["proj_dim"], K=slices, provider=provider)
                rows.append(row)
                print(f"#   timing batch {batch}, K {slices}, {provider}", file=sys.stderr, flush=True)
                try:
                    sigreg_module = make_sigreg(provider, slices).to(device)
                    step = cases[batch].step_fn(sigreg_module)
                    step()  # warm-up (kernel compiles, allocator)
                    if device == "cuda":
                        row["peak_mib"] = round(cuda_peak_memory_mib(step), 1)
                    row["step_ms"] = round(median_ms(step, device, steps, warmup=0), 3)
                    row["sigreg_ms"] = round(sigreg_alone_ms(sigreg_module, batch, cfg["proj_dim"], device,
                                                             max(steps, 5)), 3)
                except Exception as error:  # a backend that fails here is reported, the others still run
                    row["error"] = f"{type(error).__name__}: {error}"[:300]
    if device != "cuda":
        ok = [(row["batch"], row["K"], row["provider"]) for row in rows if "error" not in row]
        memory = cpu_peak_memory(args, ok)
        for row in rows:
            row["peak_mib"] = memory.get((row["batch"], row["K"], row["provider"]), row.get("peak_mib"))
    print(f"{'batch':>5} {'V*B':>5} {'K':>5} {'provider':>10} {'step ms':>9} {'SIGReg ms':>10} {'share':>6} "
          f"{'peak MiB':>9} {'step vs ref':>11}")
    fmt = lambda v, spec: format(v, spec) if v is not None else "-"  # noqa: E731
    reference = {}
    for row in rows:
        lead = f"{row['batch']:>5} {VIEWS * row['batch']:>5} {row['K']:>5} {row['provider']:>10}"
        if "error" in row:
            print(f"{lead} error: {row['error'].splitlines()[0][:120]}")
            continue
        if row["provider"] == "reference":
            reference[row["batch"], row["K"]] = row
        ref = reference.get((row["batch"], row["K"]))
        row["sigreg_share"] = round(row["sigreg_ms"] / row["step_ms"], 4)
        row["speedup_vs_reference"] = round(ref["step_ms"] / row["step_ms"], 3) if ref else None
        memory_ratio = (f" (mem {row['peak_mib'] / ref['peak_mib']:.2f}x ref)"
                        if ref and ref is not row and row.get("peak_mib") and ref.get("peak_mib") else "")
        print(f"{lead} {row['step_ms']:>9.1f} {row['sigreg_ms']:>10.2f} {row['sigreg_share']:>6.1%} "
              f"{fmt(row.get('peak_mib'), '9.1f')} {fmt(row['speedup_vs_reference'], '10.2f')}"
              f"{'x' if ref else ''}{memory_ratio}")
    print("\n# the same rows as CSV")
    stdout_writer = csv.DictWriter(sys.stdout, fieldnames=CSV_FIELDS, lineterminator="\n")
    stdout_writer.writeheader()
    for out in (stdout_writer, writer):
        out.writerows(rows)


def overhead_rows(device, providers, calls):
    """Per-call cost of forward + backward at a tiny shape: x (4, 16, 8), K = 16.

    Wall time, and the process's CPU time per call, which a machine shared with
    other work inflates less. On CPU with one intra-op thread: the arithmetic is too
    small to use a second one, and a thread pool's hand-offs on a busy machine would
    be timed instead of the entry points.
    """
    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(1)
    try:
        return _overhead_rows(device, providers, calls)
    finally:
        torch.set_num_threads(threads)


def _overhead_rows(device, providers, calls):
    x = torch.randn(4, 16, 8, device=device, requires_grad=True)
    directions = torch.randn(8, 16, device=device)
    directions = directions / directions.norm(dim=0)
    entries = [("sigreg_reference(x, A)  [eager reference]", lambda: sigreg_reference(x, directions))]
    for name in providers:
        if name != "reference":
            entries.append((f"sigreg(x, A, backend={name!r})", lambda n=name: sigreg(x, directions, backend=n)))
    entries.append(("sigreg(x, A, backend='reference')", lambda: sigreg(x, directions, backend="reference")))
    fused = [p for p in providers if p != "reference"]
    if fused:
        module = SIGReg(num_slices=16, backend=fused[0]).to(device)
        entries.append((f"SIGReg(num_slices=16, backend={fused[0]!r})(x)", lambda: module(x)))
        # The module's own part: the step and the draw of its directions (no backward).
        entries.append(("  of which SIGReg.next_directions(x, 16)  [forward only]",
                        lambda: module.next_directions(x, 16)))
        slicing = SlicingUnivariateTest(EppsPulley(), 16).to(device)
        slicing.univariate_test.backend = fused[0]
        entries.append((f"SlicingUnivariateTest(EppsPulley(), 16)(x)  [{fused[0]}]", lambda: slicing(x)))
    print(f"# per-call overhead: forward + backward at x (4, 16, 8), K = 16 (median of 5 batches of {calls} "
          f"calls; {'1 CPU thread' if device == 'cpu' else 'host time, one synchronize per batch'})")
    print(f"  {'entry point':<58} {'wall us':>8} {'CPU us':>8}  vs eager reference (CPU time)")
    results = []
    for label, fn in entries:
        def run(fn=fn, backward="forward only" not in label):
            x.grad = None
            out = fn()
            if backward:
                out.backward()

        try:
            for _ in range(20):
                run()
            batches = []
            for _ in range(5):
                synchronize(device)
                start, cpu_start = time.perf_counter(), time.process_time()
                for _ in range(calls):
                    run()
                synchronize(device)
                batches.append(((time.perf_counter() - start) / calls * 1e6,
                                (time.process_time() - cpu_start) / calls * 1e6))
            wall_us = sorted(b[0] for b in batches)[2]
            cpu_us = sorted(b[1] for b in batches)[2]
        except Exception as error:
            print(f"  {label:<58} error: {type(error).__name__}: {str(error).splitlines()[0][:100]}")
            continue
        results.append((label, wall_us, cpu_us))
        print(f"  {label:<58} {wall_us:>8.0f} {cpu_us:>8.0f}  {cpu_us / results[0][2]:.2f}x", flush=True)
    return results


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def load_average() -> str:
    """The machine's 1-minute load average: other work on the cores skews every time here."""
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "-"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="smaller batches, fewer steps, and --overhead")
    parser.add_argument("--overhead", action="store_true", help="the per-call overhead table too")
    parser.add_argument("--overhead-only", action="store_true", help="only the per-call overhead table")
    parser.add_argument("--providers", nargs="+", default=None,
                        help="default: reference and every fused backend built for the device")
    parser.add_argument("--csv", default=None, help="default: bench/results/step-<device>-<date>.csv")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (torch.set_num_threads); default: 1 with --quick (steady numbers, and "
                             "in time, on a machine busy with other work), else torch's default")
    parser.add_argument("--memory-pass", default=None, help=argparse.SUPPRESS)  # internal: see cpu_peak_memory
    args = parser.parse_args()
    device = args.device
    if args.threads is None and args.quick and device == "cpu":
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_pass:
        memory_pass(device, MODELS[device], [tuple(c) for c in json.loads(args.memory_pass)])
        return
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    args.date = datetime.date.today().isoformat()
    providers = args.providers or ["reference", *[b for b in available_backends(device) if b != "reference"]]
    name = torch.cuda.get_device_name() if device == "cuda" else cpu_name()
    print(f"# {name}, {torch.get_num_threads()} thread(s), torch {torch.__version__}, "
          f"sigreg_kernels {sigreg_kernels.__version__}, {args.date}, load average {load_average()}")
    start = time.perf_counter()
    if args.quick or args.overhead or args.overhead_only:
        overhead_rows(device, providers, calls=50 if args.quick else 200)
        print()
    if not args.overhead_only:
        csv_path = args.csv or os.path.join(HERE, "results", f"step-{device}-{args.date}.csv")
        os.makedirs(os.path.dirname(os.path.abspath(csv_path)), exist_ok=True)
        new_file = not os.path.exists(csv_path)
        with open(csv_path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            if new_file:
                writer.writeheader()
            step_rows(args, device, MODELS[device], providers, writer)
        print(f"# rows appended to {os.path.relpath(csv_path)}")
    print(f"# {time.perf_counter() - start:.0f} s, load average {load_average()}")


if __name__ == "__main__":
    main()
