"""The validation report: report.json (versioned JSON Schema), report.md and the two plots.

Schema version 2 (validation/README.md): `parity` holds `fidelity` (is the artifact the model it
claims to be) and `quality` (how far a quantized artifact is from the float model), each with its
own gates, per-step metrics, generation match and corpus statistics; `parity.failures` lists every
broken threshold of both, tagged with its section.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from exporter.artifact import write_new
from exporter.config import MistralConfig
from exporter.manifest import dumps
from validation import markdown, plots

REPORT_SCHEMA_VERSION = 2
FILES = ("report.json", "report.md", "latency.png", "parity.png")  # what a validation run (re)writes
LEVELS = ("device", "mil-reference", "onnx-proxy")
_NUM = {"type": ["number", "string", "null"]}  # "inf"/"nan" are written as strings (strict JSON)
_STATS = {"type": "object", "required": ["median_ms", "p90_ms", "runs"],
          "properties": {"median_ms": {"type": "number"}, "p90_ms": {"type": "number"},
                         "runs": {"type": "integer"}}}
_CORPUS = {"type": "object", "required": ["positions", "mean_kl", "mean_kl_stderr", "kl_percentiles", "same_top_pct",
                                          "same_top_pct_stderr", "delta_p_pct", "ppl_reference", "ppl_artifact",
                                          "ppl_ratio", "kl_quantiles"]}
_FAILURE = {"type": "object", "required": ["metric", "step", "value", "threshold", "bound"],
            "properties": {"bound": {"enum": ["max", "min", "equal"]}}}
_SECTION = {
    "type": "object", "required": ["status"],
    "properties": {
        "status": {"enum": ["passed", "failed", "same-as-fidelity"]},
        "precision_gates": {"type": "string"},
        "gates": {"type": "object", "additionalProperties": _NUM},
        "reference_weights": {"type": "string"},
        "weights": {"type": ["object", "null"], "required": ["status", "method", "checked", "mismatches"]},
        "case": {"type": "object"},
        "worst": {"type": "object", "additionalProperties": _NUM},
        "generation": {"type": "object"},
        "steps": {"type": "array", "items": {
            "type": "object", "required": ["step", "max_abs", "mean_abs", "cosine", "top1", "kl"]}},
        "corpus": _CORPUS,
        "failures": {"type": "array", "items": _FAILURE},
    },
}

# JSON Schema of report.json; pipelines may validate against it (validation/README.md explains it).
REPORT_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["schema", "schema_version", "artifact", "fingerprint", "parity", "latency"],
    "properties": {
        "schema": {"const": "mistral-export/validation-report"},
        "schema_version": {"const": REPORT_SCHEMA_VERSION},
        # id: sha256 over the artifact's files but the reports (exporter.manifest.artifact_id).
        "artifact": {"type": "object", "required": ["id", "target", "precision", "device", "model"],
                     "properties": {"id": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                                    "shape": {"type": "string"}}},
        "fingerprint": {"type": "object", "required": ["cpu", "os", "runtime"]},
        "parity": {
            "type": "object", "required": ["status", "level"],
            "properties": {
                "status": {"enum": ["passed", "failed", "not-run"]},
                "level": {"enum": list(LEVELS)},
                "measured_on": {"type": ["string", "object"]},
                "reference": {"type": "object", "required": ["kind", "dtype", "weights"]},
                "corpus_source": {"type": "object"},
                "fidelity": _SECTION,
                "quality": _SECTION,
                "tokenizer": {"type": "object", "required": ["status"],
                              "properties": {"status": {"enum": ["passed", "failed", "not-run"]},
                                             "tokenizers": {"type": "array", "items": {
                                                 "type": "object", "required": ["tokenizer", "status"]}}}},
                "failures": {"type": "array", "items": {**_FAILURE, "required": ["section", *_FAILURE["required"]]}},
                # Switchable LoRA adapters, by name: parity with the adapter active against the reference
                # with it merged; their failures are in `failures` too, as section "adapter NAME: ...".
                "adapters": {"type": "object", "additionalProperties": {
                    "type": "object", "required": ["status", "fidelity", "quality", "failures"],
                    "properties": {"status": {"enum": ["passed", "failed"]}, "fidelity": _SECTION,
                                   "quality": _SECTION}}},
                # Runners that pad chunks to fixed function lengths (Core ML): what the validation
                # prompts cost, tokens computed against real tokens.
                "padding": {"type": "object", "required": ["computed_tokens", "real_tokens", "overhead"],
                            "properties": {"computed_tokens": {"type": "integer"}, "real_tokens": {"type": "integer"},
                                           "overhead": {"type": ["number", "null"]}}},
            },
        },
        "latency": {
            "type": "object", "required": ["status", "level"],
            "properties": {
                "status": {"enum": ["measured", "not-run"]},
                "level": {"enum": list(LEVELS)},
                "prefill": {"type": "array", "items": {**_STATS, "required": ["tokens", *_STATS["required"]]}},
                "decode": {"type": "array", "items": {**_STATS, "required": ["fill", "tokens_per_s",
                                                                             *_STATS["required"]]}},
                "peak_rss_mb": _NUM,
                "device_memory_mb": _NUM,
            },
        },
    },
}


def write_all(folder: Path, report: dict[str, Any]) -> None:
    """The report files, each written as a new file (the folder may hold hard links to another's)."""
    write_new(folder / "report.json", dumps(report))
    write_new(folder / "report.md", markdown.render(report))
    for name, png in (("latency.png", plots.latency(report)), ("parity.png", plots.parity(report))):
        if png is not None:
            write_new(folder / name, png)


def model_shape(cfg: MistralConfig) -> str:
    """The dimensions validated, in words: a reduced-layer copy of a large model says so by its layer count."""
    return (f"{cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, intermediate {cfg.intermediate_size}, "
            f"heads {cfg.num_attention_heads}/{cfg.num_key_value_heads} (query/KV), vocab {cfg.vocab_size}, "
            + (f"window {cfg.sliding_window}" if cfg.sliding_window else "no window"))
