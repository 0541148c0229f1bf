"""Training logs: TensorBoard event files, metrics.jsonl and a console progress line.

Only process 0 writes; other processes get a logger that does nothing.
"""

import json
import math
import os
import sys
import time

from tensorboardX import SummaryWriter


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


class MetricsLogger:
    """Writes one record per logged step to every sink; `enabled=False` writes nothing."""

    def __init__(self, workdir: str, total_steps: int, *, enabled: bool = True):
        self.enabled = enabled
        self.total_steps = total_steps
        if enabled:
            self.writer = SummaryWriter(logdir=workdir, flush_secs=10)
            self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")  # noqa: SIM115

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        record = {"step": step, **{k: _json_number(v) for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()

    def figure(self, step: int, tag: str, figure) -> None:
        """A matplotlib figure as a TensorBoard image (closed afterwards)."""
        if self.enabled:
            self.writer.add_figure(tag, figure, step, close=True)

    def progress(self, step: int, loss: float, tokens_per_second: float, seconds_per_step: float):
        if not self.enabled:
            return
        eta = (self.total_steps - step) * seconds_per_step
        width = len(str(self.total_steps))
        print(
            f"step {step:>{width}}/{self.total_steps} | loss {loss:.4f} | "
            f"{tokens_per_second:,.0f} tok/s | ETA {format_duration(eta)}",
            flush=True,
        )

    def message(self, text: str) -> None:
        if self.enabled:
            print(text, file=sys.stdout, flush=True)

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self.jsonl.close()


def _json_number(value: float):
    # JSON has no NaN/Inf; keep them readable as strings rather than breaking the file.
    return value if math.isfinite(value) else str(value)


class Throughput:
    """Tokens per second and seconds per step between two log points."""

    def __init__(self, tokens_per_step: int):
        self.tokens_per_step = tokens_per_step
        self.last_time = None
        self.last_step = None

    def mark(self, step: int) -> tuple[float, float]:
        now = time.perf_counter()
        if self.last_time is None or step == self.last_step:
            rates = (math.nan, math.nan)
        else:
            seconds_per_step = (now - self.last_time) / (step - self.last_step)
            rates = (self.tokens_per_step / seconds_per_step, seconds_per_step)
        self.last_time, self.last_step = now, step
        return rates
