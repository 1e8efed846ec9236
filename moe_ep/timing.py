"""Per-phase latency of the MoE forward (router, dispatch, experts, combine, ...).

CUDA: events recorded on the stream, read once when a summary is asked for (no sync per
phase). CPU: wall clock.
"""
from __future__ import annotations

import contextlib
import time
from collections import defaultdict

import torch

PHASES = ("attention", "router", "dispatch", "experts", "combine")   # timed by PhaseTimer
ALL_PHASES = PHASES + ("other",)                                   # other = step latency - timed phases


class PhaseTimer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._pending: list[tuple[str, object, object]] = []
        self.totals_ms: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def phase(self, name: str):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._pending.append((name, start, end))
        else:
            t0 = time.perf_counter()
            yield
            self.totals_ms[name] += (time.perf_counter() - t0) * 1e3

    def collect(self) -> dict[str, float]:
        """Milliseconds per phase since the last `reset` (synchronises CUDA once)."""
        if self._pending:
            torch.cuda.synchronize()
            for name, start, end in self._pending:
                self.totals_ms[name] += start.elapsed_time(end)
            self._pending.clear()
        return dict(self.totals_ms)

    def reset(self) -> None:
        self._pending.clear()
        self.totals_ms.clear()


def maybe_phase(timer: "PhaseTimer | None", name: str):
    return timer.phase(name) if timer is not None else contextlib.nullcontext()
