"""End-to-end tests of the LeJEPA pretraining example, ``python/pretrain_vit.py``.

Every test runs the script as a user would (a subprocess, ``--smoke`` sized)
and checks what it leaves in ``--out``: ``summary.json``, ``curves.png``,
``checkpoint.pt`` and the per-step ``metrics.jsonl``.
"""

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sigreg_kernels

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "python" / "pretrain_vit.py"
FEATURE_SETS = {"lejepa", "random_init", "raw_pixels"}
PROTOCOLS = {"linear_probe", "linear_probe_10shot", "knn"}


def run(*args, processes=1, timeout=240):
    """Run the script (under torchrun when ``processes > 1``); returns the CompletedProcess."""
    env = dict(os.environ, OMP_NUM_THREADS="1")  # keep torchrun quiet; the script sets its own threads
    if processes > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
               "--master_addr=127.0.0.1", f"--master_port={port}", str(SCRIPT)]
    else:
        cmd = [sys.executable, str(SCRIPT)]
    return subprocess.run(cmd + [str(a) for a in args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def run_ok(*args, **kwargs):
    proc = run(*args, **kwargs)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return proc


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def assert_curves_close(a, b, rtol, keys=("loss", "invariance", "sigreg", "probe_loss")):
    assert len(a) == len(b) and a, f"{len(a)} vs {len(b)} steps"
    for ra, rb in zip(a, b):
        assert ra["step"] == rb["step"]
        for key in keys:
            assert math.isclose(ra[key], rb[key], rel_tol=rtol, abs_tol=1e-7), \
                f"step {ra['step']} {key}: {ra[key]!r} vs {rb[key]!r}"


def test_smoke_run_writes_summary_curves_and_checkpoint(tmp_path):
    out = tmp_path / "run"
    proc = run_ok("--smoke", "--out", out)
    summary = json.loads((out / "summary.json").read_text())
    assert PROTOCOLS <= set(summary)
    for protocol in PROTOCOLS:
        assert set(summary[protocol]) == FEATURE_SETS
        for name, acc in summary[protocol].items():
            assert 0.0 <= acc <= 1.0, (protocol, name, acc)
    # Raw pixels of digits are easy; a broken split, label order or probe would show here.
    assert summary["linear_probe"]["raw_pixels"] > 0.9
    assert summary["knn"]["raw_pixels"] > 0.9
    assert 0 < summary["minutes"] < 5
    assert "linear_probe_10shot" in proc.stdout and "raw_pixels" in proc.stdout  # the printed table
    # stdout is a pipe here, as in a batch job: progress lines (the first step, every 20 s, the last), no bar.
    progress = [line for line in proc.stdout.splitlines() if line.startswith("step ")]
    assert progress[0].startswith("step 1/4 (25%) | ") and progress[-1].startswith("step 4/4 (100%) | ")
    assert "elapsed" in progress[-1] and "probe acc" in progress[-1]
    assert "\r" not in proc.stdout and "\r" not in proc.stderr

    png = (out / "curves.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    steps = metrics(out)
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for r in steps:
        assert all(math.isfinite(r[k]) for k in ("loss", "invariance", "sigreg", "probe_loss"))
        assert math.isclose(r["loss"], r["invariance"] + 2.0 * r["sigreg"], rel_tol=1e-6)  # default lambda
    assert (out / "checkpoint.pt").is_file()


def test_progress_bar_of_a_time_bounded_run_counts_minutes(tmp_path):
    proc = run_ok("--smoke", "--steps", 0, "--max-minutes", 2, "--stop-after", 2, "--progress", "bar",
                  "--out", tmp_path / "run")
    assert "/2.0 min [" in proc.stdout and "steps" not in proc.stdout
    assert not any(line.startswith("step ") for line in proc.stdout.splitlines())


def test_resume_continues_exactly_where_it_stopped(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_ok("--smoke", "--steps", 6, "--out", straight)
    run_ok("--smoke", "--steps", 6, "--stop-after", 3, "--out", split)
    # Stopped early: a checkpoint but no final evaluation yet.
    assert (split / "checkpoint.pt").is_file() and not (split / "summary.json").exists()
    assert len(metrics(split)) == 3
    second = run_ok("--smoke", "--steps", 6, "--resume", "--out", split)
    assert "resumed from" in second.stderr and "at step 3" in second.stderr
    assert (split / "summary.json").is_file()
    # Same data order, views, directions, optimizer state: the curves are identical.
    assert_curves_close(metrics(straight), metrics(split), rtol=1e-6)


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    proc = run("--smoke", "--resume", "--out", tmp_path / "nothing")
    assert proc.returncode == 2
    assert "--resume" in proc.stderr and "no checkpoint" in proc.stderr


@pytest.mark.parametrize("case", ["missing", "file", "empty", "no_images", "one_class"])
def test_bad_data_is_a_clear_error(tmp_path, case):
    path = tmp_path / "data"
    if case == "file":
        path.write_text("not a folder")
    elif case != "missing":
        path.mkdir()
    if case == "no_images":
        (path / "cats").mkdir()
        (path / "cats" / "notes.txt").write_text("no images here")
    if case == "one_class":
        from PIL import Image

        (path / "cats").mkdir()
        Image.new("L", (8, 8)).save(path / "cats" / "a.png")
    proc = run("--smoke", "--data", path, "--out", tmp_path / "out")
    assert proc.returncode == 2, proc.stderr
    assert "--data" in proc.stderr and str(path) in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "summary.json").exists()


def make_image_folder(root, per_class=12, size=20):
    """Three classes of RGB PNGs with distinct patterns (stripes either way, a square) plus noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    patterns = {
        "horizontal": (yy // 3) % 2 == 0,
        "vertical": (xx // 3) % 2 == 0,
        "square": (abs(yy - size / 2) < size / 4) & (abs(xx - size / 2) < size / 4),
    }
    for name, mask in patterns.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            color = rng.uniform(0.5, 1.0, 3)
            image = mask[..., None] * color + rng.normal(0, 0.08, (size, size, 3))
            Image.fromarray((image.clip(0, 1) * 255).astype(np.uint8), "RGB").save(root / name / f"{i:03d}.png")


def test_image_folder_run(tmp_path):
    data, out = tmp_path / "images", tmp_path / "run"
    make_image_folder(data)
    proc = run_ok("--smoke", "--data", data, "--image-size", 16, "--out", out)
    summary = json.loads((out / "summary.json").read_text())
    for protocol in PROTOCOLS:
        assert set(summary[protocol]) == FEATURE_SETS
    # 3 classes x 12 images, a quarter held out: the table reports 9 held-out images.
    assert "(9 images; train split 27)" in proc.stdout
    # The three patterns are trivially separable from pixels: labels and images line up.
    assert summary["linear_probe"]["raw_pixels"] == 1.0
    ckpt_args = torch.load(out / "checkpoint.pt", weights_only=False)["args"]
    assert ckpt_args["data"] == str(data)


def test_two_processes_match_one_process_on_the_global_batch(tmp_path):
    """torchrun with 2 gloo processes (half the batch each) gives the single-process losses.

    SIGReg is computed on the global batch inside the op; the invariance and
    probe losses are averaged over processes; DDP averages gradients. Views and
    data order are drawn for the global batch, so both runs see the same images.
    """
    one, two = tmp_path / "one", tmp_path / "two"
    run_ok("--smoke", "--steps", 5, "--out", one)
    proc = run_ok("--smoke", "--steps", 5, "--out", two, processes=2)
    assert (two / "summary.json").is_file()
    assert proc.stdout.count("held-out accuracy") == 1  # only rank 0 evaluates
    # Float sums are taken in another order (per process, then across), hence a tolerance.
    assert_curves_close(metrics(one), metrics(two), rtol=1e-5)


@pytest.mark.parametrize("backend", ["cpu"])
def test_fused_backend_trains_like_the_reference(tmp_path, backend):
    """Swapping the reference SIGReg for the fused kernel changes no curve beyond fp32 rounding.

    The op agrees with the reference to ~1e-7 relative per call; 20 optimizer
    steps on top of that stay within 1e-5 (measured: a few 1e-7).
    """
    if backend not in sigreg_kernels.available_backends():
        pytest.skip(f"sigreg_kernels backend {backend!r} is not built here")
    args = ("--smoke", "--steps", 20, "--probe-draws", 1)
    run_ok(*args, "--sigreg-backend", "reference", "--out", tmp_path / "reference")
    run_ok(*args, "--sigreg-backend", backend, "--out", tmp_path / backend)
    reference, fused = metrics(tmp_path / "reference"), metrics(tmp_path / backend)
    assert len(reference) == 20
    assert_curves_close(reference, fused, rtol=1e-5)
    # The run actually trained: the loss moved.
    assert abs(reference[-1]["loss"] - reference[0]["loss"]) > 1e-3 * abs(reference[0]["loss"])


# ----------------------------------------------------------------------------- progress reporting


def load_progress_module():
    """python/progress.py, loaded by path (python/ is not a package; no sys.path change)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("pretrain_progress", ROOT / "python" / "progress.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def record(step):
    return dict(loss=3.0 * step, invariance=1.0 * step, sigreg=1.0 * step, probe_loss=0.5, probe_acc=step / 100)


def run_progress(mode, total_steps, budget, steps, seconds_per_step=1.0, stream=None, interval=20.0):
    """Reports ``steps`` steps (``seconds_per_step``: a number, or one per step) on a fake clock."""
    import io

    progress_module = load_progress_module()
    stream = io.StringIO() if stream is None else stream
    clock = FakeClock()
    report = progress_module.Progress(mode, total_steps, budget, interval=interval, stream=stream, clock=clock)
    durations = seconds_per_step if isinstance(seconds_per_step, list) else [seconds_per_step] * steps
    for step in range(1, steps + 1):
        clock.now += durations[step - 1]
        report.update(step, clock.now, record(step))
    report.close(steps, clock.now)
    return report, stream.getvalue()


def test_progress_lines_at_a_steady_interval_with_window_means():
    report, text = run_progress("auto", total_steps=100, budget=0, steps=100)
    assert report.mode == "lines"  # a StringIO is not a terminal
    lines = text.splitlines()
    # The first step, then every 20 s (one step per second), then the last step.
    assert [line.split(" |")[0] for line in lines] == [
        "step 1/100 (1%)", "step 21/100 (21%)", "step 41/100 (41%)", "step 61/100 (61%)", "step 81/100 (81%)",
        "step 100/100 (100%)"]
    assert "\r" not in text
    # Means over the steps since the previous line: steps 2..21 -> loss 3 * 11.5, probe acc 0.115.
    assert "loss 34.5000 (inv 11.5000, sigreg 11.5000) | probe acc 0.115, loss 0.500" in lines[1]
    assert "21s elapsed, ~1m19s left" in lines[1]  # 1 s per step, 79 steps to go
    assert lines[-1].split(" | ")[1] == "1m40s elapsed, ~0s left"


def test_progress_lines_of_a_time_bounded_run_count_minutes():
    _, text = run_progress("lines", total_steps=0, budget=120.0, steps=50, seconds_per_step=2.4)
    lines = text.splitlines()
    assert lines[0].startswith("step 1 | 0.0/2.0 min | 2s elapsed, ~1m58s left")
    assert lines[-1].startswith("step 50 | 2.0/2.0 min | 2m00s elapsed, ~0s left")
    assert len(lines) == 7  # steps 1, 10, 19, 28, 37, 46 (every 21.6 s >= 20 s) and the last


class FakeTerminal:
    """A stream that says it is a terminal, as a user's console does."""

    def __init__(self):
        import io

        self.buffer = io.StringIO()

    def isatty(self):
        return True

    def write(self, text):
        return self.buffer.write(text)

    def flush(self):
        pass

    def getvalue(self):
        return self.buffer.getvalue()


def test_progress_bar_counts_what_bounds_the_run():
    report, text = run_progress("auto", total_steps=10, budget=0, steps=10, stream=FakeTerminal())
    assert report.mode == "bar"
    assert "10/10 steps" in text and "%|" in text and "100%|" in text
    assert "/100%" not in text  # the old bar counted per cent of itself
    _, text = run_progress("bar", total_steps=0, budget=120.0, steps=10, seconds_per_step=12.0)
    assert "2.0/2.0 min" in text and "steps" not in text
    # Both bounds: steps while they are nearer their end, minutes once the clock overtakes them.
    # (5 steps of 1 s, then steps of 13 s: the clock leads from step 9, 0.9 < 57 s / 60 s; the step bar
    # is closed, showing where it stopped.)
    _, text = run_progress("bar", total_steps=10, budget=60.0, steps=10, seconds_per_step=[1.0] * 5 + [13.0] * 5)
    assert "8/10 steps" in text and "9/10 steps" not in text and "1.0/1.0 min" in text


def test_progress_none_prints_nothing():
    _, text = run_progress("none", total_steps=10, budget=0, steps=10)
    assert text == ""
    with pytest.raises(ValueError, match="progress mode must be one of"):
        run_progress("fancy", total_steps=10, budget=0, steps=1)
