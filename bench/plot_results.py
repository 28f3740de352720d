"""Plots fwd+bwd time against K, D and N from a CSV written by bench_sigreg.py.

    python bench/plot_results.py bench/results/cpu-float32-2026-11-21.csv   # writes the .png beside it
    python bench/plot_results.py bench/results/h200-2026-12-04/bench.csv bfloat16   # one dtype: bench-bfloat16.png
"""

import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(csv_path: str, dtype: str | None = None) -> str:
    """Plots the fwd+bwd rows (of ``dtype`` only, where given: a CSV may hold several)."""
    with open(csv_path) as f:
        rows = [r for r in csv.DictReader(f) if r["mode"] == "fwd+bwd" and dtype in (None, r["dtype"])]
    main_size = next(r for r in rows if r["sweep"] == "main")
    sweeps = [s for s in ("K", "D", "N") if any(r["sweep"] == s for r in rows)]
    fig, axes = plt.subplots(1, len(sweeps), figsize=(5 * len(sweeps), 4), squeeze=False)
    for ax, sweep in zip(axes[0], sweeps):
        chosen = [r for r in rows if r["sweep"] in (sweep, "main")]
        for provider in dict.fromkeys(r["provider"] for r in chosen):
            points = sorted((int(r[sweep]), float(r["ms"])) for r in chosen if r["provider"] == provider)
            ax.plot(*zip(*points), marker="o", label=provider)
        floor = sorted({(int(r[sweep]), float(r["floor_ms"])) for r in chosen})
        ax.plot(*zip(*floor), linestyle="--", color="gray", label="floor (matmuls)")
        fixed = ", ".join(f"{k}={main_size[k]}" for k in ("N", "D", "K") if k != sweep)
        ax.set(xscale="log", yscale="log", xlabel=sweep, ylabel="fwd+bwd time (ms)", title=f"{fixed}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend()
    fig.suptitle(f"SIGReg fwd+bwd, {main_size['device']} {main_size['dtype']}: {main_size['machine']}", fontsize=8)
    fig.tight_layout()
    png_path = csv_path.rsplit(".", 1)[0] + (f"-{dtype}" if dtype else "") + ".png"
    fig.savefig(png_path, dpi=120)
    return png_path


if __name__ == "__main__":
    print(main(*sys.argv[1:3]))
