"""latency.png (prefill per chunk length, decode per cache fill) and parity.png (the CDF of
per-position KL over the corpus, fidelity and quality), as PNG bytes."""

from __future__ import annotations

import io
from typing import Any


def figure(width: float, cols: int = 2, height: float = 3.5) -> tuple[Any, Any]:
    """pyplot (headless) and a new figure with `cols` axes side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, plt.subplots(1, cols, figsize=(width, height))


def png(plt: Any, fig: Any) -> bytes:
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def latency(report: dict[str, Any]) -> bytes | None:
    lat = report["latency"]
    if lat["status"] != "measured":
        return None
    plt, (fig, (left, right)) = figure(9)
    for ax, rows, x, title in ((left, lat["prefill"], "tokens", "prefill (TTFT)"),
                               (right, lat["decode"], "fill", "decode per token")):
        xs = [r[x] for r in rows]
        ax.plot(xs, [r["median_ms"] for r in rows], "o-", label="median")
        ax.plot(xs, [r["p90_ms"] for r in rows], "x--", label="p90")
        ax.set_xlabel("chunk tokens" if x == "tokens" else "cache fill")
        ax.set_ylabel("ms")
        ax.set_title(title)
        ax.legend()
    a = report["artifact"]
    fig.suptitle(f"{a['target']} {a['precision']} on {report['fingerprint']['cpu'][:50]} ({lat['level']})", fontsize=9)
    return png(plt, fig)


def parity(report: dict[str, Any]) -> bytes | None:
    p = report["parity"]
    sections = [(name, p[name]) for name in ("fidelity", "quality") if isinstance(p.get(name), dict)
                and p[name].get("corpus")]
    if not sections:
        return None
    plt, (fig, (left, right)) = figure(9)
    percent = list(range(101))
    for name, part in sections:
        q = part["corpus"]["kl_quantiles"]
        left.plot([max(v, 1e-12) for v in q], percent, label=f"{name} (mean {part['corpus']['mean_kl']:.2g})")
        right.plot(percent[90:], q[90:], "o-", label=name)
        gate = part["gates"].get("corpus_kl_p99")
        if isinstance(gate, float) and gate != float("inf"):
            right.axhline(gate, linestyle="--", linewidth=0.8, label=f"{name} p99 gate")
    left.set_xscale("log")
    left.set_xlabel("KL(reference || artifact), nats")
    left.set_ylabel("% of corpus positions at or below")
    left.set_title("KL distribution (CDF)")
    left.legend(fontsize=8)
    right.set_xlabel("percentile")
    right.set_ylabel("KL, nats")
    right.set_title("upper tail")
    right.legend(fontsize=8)
    a = report["artifact"]
    fig.suptitle(f"{a['target']} {a['precision']}: corpus of {sections[0][1]['corpus']['positions']} positions "
                 f"({p['level']})", fontsize=9)
    return png(plt, fig)
