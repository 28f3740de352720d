"""Progress of a training run: a bar on a terminal, a line at a steady interval in a log.

A batch job's log is a file: a progress bar redrawn every step fills it with
carriage returns (about 1 MB for the default run). ``mode="auto"`` draws the bar
only when the stream is a terminal and otherwise prints one self-contained line
every ``interval`` seconds (and at the first and last step):

    step 480/2000 (24%) | 1m12s elapsed, ~3m48s left | loss 1.0311 (inv 0.0893, sigreg 0.4709) | ...
    ... probe acc 0.912, loss 0.301 | 6.7 steps/s                               (one line)

Losses and probe accuracy are means over the steps since the previous line.
The bar counts what bounds the run: steps (``--steps``/``--epochs``) or minutes
(``--max-minutes``); with both, whichever is nearer its end.
"""

import math
import sys
import time

MODES = ("auto", "bar", "lines", "none")


def resolve_mode(mode: str, stream) -> str:
    if mode not in MODES:
        raise ValueError(f"progress mode must be one of {MODES}, got {mode!r}")
    if mode != "auto":
        return mode
    isatty = getattr(stream, "isatty", None)
    return "bar" if isatty is not None and isatty() else "lines"


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class Progress:
    """Reports a run bounded by ``total_steps`` (0: none) and/or ``budget`` seconds (0: none).

    ``update(step, seconds, record)`` after every step, with the steps done, the
    training clock and the step's metrics (``loss``, ``invariance``, ``sigreg``,
    ``probe_loss``, ``probe_acc``); ``close(step, seconds)`` at the end.
    """

    def __init__(self, mode, total_steps, budget, *, interval=20.0, stream=None, clock=time.monotonic,
                 enabled=True):
        self.stream = sys.stdout if stream is None else stream
        self.mode = resolve_mode(mode, self.stream) if enabled else "none"
        self.total_steps, self.budget, self.interval, self.clock = total_steps, budget, interval, clock
        self.window = []  # records since the last line
        self.last_line = None  # clock time of the last line
        self.last_step = None
        self.bar = None
        self.bar_unit = None

    # ------------------------------------------------------------------ what bounds the run

    def bound(self, step, seconds) -> str:
        """"steps" or "minutes": the bound nearer its end (steps when neither has started)."""
        by_steps = step / self.total_steps if self.total_steps else -1.0
        by_time = seconds / self.budget if self.budget else -1.0
        return "minutes" if by_time > by_steps else "steps"

    def remaining(self, step, seconds) -> float:
        estimates = []
        if self.total_steps and step:
            estimates.append(seconds / step * (self.total_steps - step))
        if self.budget:
            estimates.append(self.budget - seconds)
        return max(0.0, min(estimates)) if estimates else math.nan

    # ------------------------------------------------------------------ reporting

    def update(self, step, seconds, record):
        if self.mode == "none":
            return
        self.window.append(record)
        if self.mode == "bar":
            self._update_bar(step, seconds, record)
        elif self.last_line is None or self.clock() - self.last_line >= self.interval:
            self._line(step, seconds)

    def close(self, step, seconds):
        if self.mode == "lines" and self.window and self.last_step != step:
            self._line(step, seconds)
        if self.bar is not None:
            self.bar.close()

    def _update_bar(self, step, seconds, record):
        from tqdm import tqdm

        unit = self.bound(step, seconds)
        if unit != self.bar_unit:  # the first step, or the other bound took over
            if self.bar is not None:
                self.bar.close()
            if unit == "steps":
                self.bar = tqdm(total=self.total_steps, file=self.stream, dynamic_ncols=True, unit="step",
                                bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} steps [{elapsed}<{remaining}{postfix}]")
            else:
                self.bar = tqdm(total=self.budget / 60, file=self.stream, dynamic_ncols=True, unit="min",
                                bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} min [{elapsed}<{remaining}{postfix}]")
            self.bar_unit = unit
        position = step if unit == "steps" else min(seconds, self.budget) / 60
        self.bar.set_postfix(inv=f"{record['invariance']:.4f}", sigreg=f"{record['sigreg']:.3f}",
                             probe=f"{record['probe_acc']:.2f}", refresh=False)
        self.bar.update(position - self.bar.n)  # tqdm redraws at most every 0.1 s

    def _line(self, step, seconds):
        mean = {key: sum(r[key] for r in self.window) / len(self.window)
                for key in ("loss", "invariance", "sigreg", "probe_loss", "probe_acc")}
        if self.bound(step, seconds) == "minutes":
            where = f"step {step} | {seconds / 60:.1f}/{self.budget / 60:.1f} min"
        else:
            where = f"step {step}/{self.total_steps} ({100 * step / self.total_steps:.0f}%)"
        left = self.remaining(step, seconds)
        rate = f"{step / seconds:.1f} steps/s" if seconds > 0 else ""
        print(f"{where} | {format_duration(seconds)} elapsed, ~{format_duration(left) if math.isfinite(left) else '?'}"
              f" left | loss {mean['loss']:.4f} (inv {mean['invariance']:.4f}, sigreg {mean['sigreg']:.4f}) | "
              f"probe acc {mean['probe_acc']:.3f}, loss {mean['probe_loss']:.3f} | {rate}",
              file=self.stream, flush=True)
        self.window, self.last_line, self.last_step = [], self.clock(), step
