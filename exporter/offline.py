"""No network: the runtimes' telemetry is switched off before they load.

Measured here: an OpenVINO conversion makes DNS look-ups of an analytics host (openvino_telemetry,
used by OpenVINO's converter and by NNCF), and ONNX Runtime 1.32 starts a 1DS telemetry client that
probes CA certificates and writes under ~/.cache/Microsoft. Both have documented switches:
openvino_telemetry is optional for its users (they fall back to stubs when it cannot be imported),
and ONNX Runtime reads ORT_DISABLE_TELEMETRY. tests/test_safety.py checks both with strace.
"""

from __future__ import annotations

import os
import sys


def disable_telemetry() -> None:
    """Call before openvino, nncf or onnxruntime is imported (the CLI does it first thing)."""
    os.environ["ORT_DISABLE_TELEMETRY"] = "1"
    # huggingface_hub (hub ids, transformers' tokenizers): the local cache only, no telemetry.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    # Ray (the matrix's cluster executor) reports usage statistics unless told not to.
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    if "openvino_telemetry" not in sys.modules:
        sys.modules["openvino_telemetry"] = None  # type: ignore[assignment]  # import now raises ImportError
    ort = sys.modules.get("onnxruntime")
    if ort is not None and hasattr(ort, "disable_telemetry_events"):
        ort.disable_telemetry_events()
