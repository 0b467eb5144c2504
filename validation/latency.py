"""Latency on the runner's device: prefill (TTFT) per chunk length, decode per cache fill, memory,
and a fingerprint of where it was measured."""

from __future__ import annotations

import os
import platform
import resource
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from exporter.errors import UserError
from targets.base import Runner
from targets.generate import prefill
from validation.parity import positions_held


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def fingerprint(runner: Runner, tool: dict[str, Any]) -> dict[str, Any]:
    """Where figures were measured: CPU or GPU, OS, runtime versions, threads."""
    info: dict[str, Any] = {"cpu": cpu_model(), "logical_cores": os.cpu_count(), "os": platform.platform(),
                            "python": platform.python_version(), "runtime": tool,
                            "threads": getattr(runner, "threads", None)}
    describe = getattr(runner, "describe_device", None)
    if callable(describe):
        info["device"] = describe()
    return info


def peak_rss_mb() -> float:
    """Peak resident set of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _stats(samples: list[float]) -> dict[str, float]:
    arr = np.array(samples) * 1000.0
    return {"median_ms": float(np.median(arr)), "p90_ms": float(np.percentile(arr, 90)), "runs": len(samples)}


DEFAULT_LENGTHS = (16, 128, 512)  # prompt (prefill) lengths; a full-capacity prefill is asked for, not default
DEFAULT_FILLS = (16, 128, 1024)  # decode cache fills


@dataclass(frozen=True)
class LatencySettings:
    """What `bench` measures; recorded in report.json. None: the defaults above."""

    prompt_lengths: tuple[int, ...] | None = None
    fills: tuple[int, ...] | None = None
    repeats: int = 5
    warmup: int = 2
    decode_steps: int = 8
    batch: int = 1
    threads: int | None = None  # the runtime's intra-op threads; None: the artifact's setting

    def check(self) -> None:
        for name, values in (("--prompt-lengths", self.prompt_lengths), ("--fills", self.fills)):
            if values is not None and (not values or min(values) < 1):
                raise UserError(f"{name} takes positive token counts, e.g. 16,128,512; got {list(values)}")
        for name, value, least in (("--repeats", self.repeats, 1), ("--warmup", self.warmup, 0),
                                   ("--batch", self.batch, 1), ("--threads", 1 if self.threads is None else self.threads, 1)):
            if value < least:
                raise UserError(f"{name} must be at least {least}, got {value}")


def points(capacity: int, window: int | None, settings: LatencySettings,
           held: int | None = None) -> tuple[list[int], list[int], list[str]]:
    """Prefill lengths and decode fills the artifact can serve, and a note for each one clipped:
    prompts to the capacity (a prefill chunk) and the positions it holds (a fused RoPE table); fills
    so that the timed steps stay within the window's ring (any fill) or the context, and the positions."""
    steps = settings.warmup + settings.decode_steps
    top_length = min(capacity, held) if held is not None else capacity
    top_fill = capacity - 1 if window else capacity - 1 - steps
    top_fill = min(top_fill, held - 1 - steps) if held is not None else top_fill
    notes = []
    wanted = settings.prompt_lengths or DEFAULT_LENGTHS
    lengths = sorted({min(t, top_length) for t in wanted})
    if max(wanted) > top_length:
        notes.append(f"prompt lengths above {top_length} measured at {top_length}: the artifact's "
                     + ("prefill chunk (capacity)" if top_length == capacity else f"{held} positions"))
    wanted = settings.fills or DEFAULT_FILLS
    fills = sorted({min(f, top_fill) for f in wanted}) if top_fill >= 1 else []
    if max(wanted) > top_fill:
        notes.append(f"fills above {max(top_fill, 0)} measured at {max(top_fill, 0)}: {steps} decode steps must "
                     f"stay within the {'positions it holds' if held is not None and top_fill == held - 1 - steps else 'context'}"
                     if top_fill >= 1 else f"no decode fill fits: {steps} decode steps exceed what the artifact holds")
    return lengths, fills, notes


def decode_seconds(runner: Runner, fill: int, steps: int, warmup: int, batch: int = 1) -> list[float]:
    """Seconds per one-token decode step of a runner whose cache holds `fill` tokens in each of its
    `batch` rows, after `warmup` untimed steps."""
    samples = []
    token = np.ones((batch, 1), dtype=np.int64)
    for s in range(warmup + steps):
        start = time.perf_counter()
        runner.step(token, np.full((batch, 1), fill + s, dtype=np.int64))
        if s >= warmup:
            samples.append(time.perf_counter() - start)
    return samples


def measure(runner: Runner, vocab: int, settings: LatencySettings | None = None,
            progress: Callable[[str, float], None] = lambda m, f: None) -> dict[str, Any]:
    """Medians and p90 over repeated runs after warm-up."""
    settings = settings or LatencySettings()
    rng = np.random.default_rng(7)
    held = positions_held(runner)
    lengths, fills, notes = points(runner.capacity, runner.window, settings, held)
    total = len(lengths) + len(fills)
    b, warmup, repeats = settings.batch, settings.warmup, settings.repeats
    result: dict[str, Any] = {"batch": b, "repeats": repeats, "warmup": warmup,
                              "settings": dataclasses.asdict(settings), "notes": notes, "prefill": [], "decode": []}
    if held is not None:
        result["positions_held"] = held  # every point stays within them
    for i, t in enumerate(lengths):
        ids = rng.integers(0, vocab, (b, t)).astype(np.int64)
        pos = np.repeat(np.arange(t, dtype=np.int64)[None], b, axis=0)
        samples = []
        for r in range(warmup + repeats):
            runner.reset(b)
            start = time.perf_counter()
            runner.step(ids, pos)
            if r >= warmup:
                samples.append(time.perf_counter() - start)
        result["prefill"].append({"tokens": t, **_stats(samples)})
        progress(f"latency prefill T={t}", (i + 1) / total)
    for i, fill in enumerate(fills):
        prompt = rng.integers(0, vocab, fill).tolist()
        prefill(runner, [prompt] * b)
        stats = _stats(decode_seconds(runner, fill, settings.decode_steps, warmup, b))
        result["decode"].append({"fill": fill, **stats, "tokens_per_s": 1000.0 * b / stats["median_ms"]})
        progress(f"latency decode fill={fill}", (len(lengths) + i + 1) / total)
    result["peak_rss_mb"] = round(peak_rss_mb(), 1)
    device_memory = getattr(runner, "device_memory_mb", None)
    result["device_memory_mb"] = device_memory() if callable(device_memory) else None
    return result
