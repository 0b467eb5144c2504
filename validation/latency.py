"""Latency on the runner's device: prefill (TTFT) per chunk length, decode per cache fill, memory,
and a fingerprint of where it was measured."""

from __future__ import annotations

import os
import platform
import resource
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from targets.generate import prefill
from targets.base import Runner


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


def default_points(capacity: int, window: int | None, steps: int) -> tuple[list[int], list[int]]:
    """Prefill chunk lengths and decode cache fills to measure. Without a window the timed decode
    steps must also fit in the context, so the last fill leaves room for them."""
    lengths = sorted({t for t in (16, 128, 512, capacity // 2, capacity) if 1 <= t <= capacity})
    top = capacity - 1 if window else capacity - 1 - steps
    fills = sorted({min(f, top) for f in (16, 128, capacity // 2, capacity - 1) if top >= 1})
    return lengths, fills


def decode_seconds(runner: Runner, fill: int, steps: int, warmup: int) -> list[float]:
    """Seconds per one-token decode step of a batch-1 runner whose cache holds `fill` tokens,
    after `warmup` untimed steps."""
    samples = []
    token = np.array([[1]], dtype=np.int64)
    for s in range(warmup + steps):
        start = time.perf_counter()
        runner.step(token, np.array([[fill + s]], dtype=np.int64))
        if s >= warmup:
            samples.append(time.perf_counter() - start)
    return samples


def measure(runner: Runner, vocab: int, repeats: int = 5, warmup: int = 2, decode_steps: int = 8,
            progress: Callable[[str, float], None] = lambda m, f: None) -> dict[str, Any]:
    """Medians and p90 over repeated runs after warm-up; batch 1."""
    rng = np.random.default_rng(7)
    lengths, fills = default_points(runner.capacity, runner.window, warmup + decode_steps)
    total = len(lengths) + len(fills)
    result: dict[str, Any] = {"batch": 1, "repeats": repeats, "warmup": warmup, "prefill": [], "decode": []}
    for i, t in enumerate(lengths):
        ids = rng.integers(0, vocab, (1, t)).astype(np.int64)
        pos = np.arange(t, dtype=np.int64)[None]
        samples = []
        for r in range(warmup + repeats):
            runner.reset(1)
            start = time.perf_counter()
            runner.step(ids, pos)
            if r >= warmup:
                samples.append(time.perf_counter() - start)
        result["prefill"].append({"tokens": t, **_stats(samples)})
        progress(f"latency prefill T={t}", (i + 1) / total)
    for i, fill in enumerate(fills):
        prefill(runner, [rng.integers(0, vocab, fill).tolist()])
        stats = _stats(decode_seconds(runner, fill, decode_steps, warmup))
        result["decode"].append({"fill": fill, **stats, "tokens_per_s": 1000.0 / stats["median_ms"]})
        progress(f"latency decode fill={fill}", (len(lengths) + i + 1) / total)
    result["peak_rss_mb"] = round(peak_rss_mb(), 1)
    device_memory = getattr(runner, "device_memory_mb", None)
    result["device_memory_mb"] = device_memory() if callable(device_memory) else None
    return result
