"""Two questions for an artifact, answered separately.

- **Fidelity**: is the artifact the model it claims to be? For a quantized artifact the reference is
  the canonical model bound to the artifact's own weights, read back and dequantized from its files
  (and each stored tensor is first compared exactly with the source weight encoded again by the
  runtime's own quantizer), so what remains is the runtime's arithmetic, gated with the row of the
  arithmetic it really uses. A wrong graph (a window off by one) or a wrong weight (a swapped head, a
  perturbed scale) fails here, however noisy 4-bit weights are. For a float artifact the reference
  is the float checkpoint and fidelity is the only question.
- **Quality** (quantized artifacts): how far is the artifact from the float model? The same
  comparison against the float checkpoint, with the precision's own gates.

Both references are the eager canonical model (validation/reference.py): nothing of the build's
trace or its cache is used.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from exporter.config import MistralConfig
from targets import registry
from targets.base import Readback, Runner
from validation import corpus
from validation.gates import GateFailureItem, corpus_failures, gates_for, loosest
from validation.parity import ParityResult, compare, default_case, positions_held
from validation.reference import EagerRunner, reference_dtype, runtime_adapter_source, source_from_manifest

QUANTIZED = ("int8", "int4", "palette4")
Progress = Callable[[str, float], None]


def _section(result: ParityResult, gates_name: str, positions: corpus.Positions, weights: Readback | None,
             reference_weights: str) -> dict[str, Any]:
    stats = corpus.summarize(positions)
    failures = list(result.failures) + corpus_failures(stats, result.gates)
    if weights is not None:
        failures += [GateFailureItem("weights", m.split(":")[0], 1.0, 0.0, "max") for m in weights.mismatches]
    return {"status": "failed" if failures else "passed", "precision_gates": gates_name, "gates": result.gates,
            "reference_weights": reference_weights,
            "weights": None if weights is None else weights.to_dict(),
            "case": result.case.describe(), "worst": result.worst(), "generation": result.generation,
            "steps": [s.to_dict() for s in result.steps], "corpus": stats,
            "failures": [f.to_dict() for f in failures]}


def check_parity(artifact: Path, manifest: dict[str, Any], runner: Runner, tokenizer: Any, req: Any,
                 progress: Progress, adapter: str | None = None) -> dict[str, Any]:
    """The report's parity section: fidelity, then (quantized artifacts) quality, then the corpus. With
    `adapter`, the runner runs that switchable adapter and the reference merges it."""
    cfg = MistralConfig(**manifest["model"]["config"])
    target = registry.get(manifest["target"]["name"])
    precision = manifest["target"]["precision"]
    source = source_from_manifest(manifest, req.reference_checkpoint, req.reference_adapter)
    if adapter is not None:
        source = runtime_adapter_source(manifest, source, adapter)
    dtype = reference_dtype(manifest, req.reference_dtype)
    capacity = manifest["cache"]["capacity"]
    quantized = precision in QUANTIZED and hasattr(target, "readback")
    if quantized and adapter is not None:  # the readback compares stored weights with the base's
        raise NotImplementedError("switchable adapters over quantized weights are not validated")
    # A target may name a gate row other than its precision (Core ML fp32 keeps fp16 state).
    quality_row = req.precision_gates or manifest["target"].get("gates") or precision
    fidelity_row = target.fidelity_gates(manifest, runner) if quantized else quality_row

    def row(name: str) -> tuple[str, dict[str, float]]:
        if dtype == torch.float32:
            return name, gates_for(name)
        return f"{name}+bf16-reference", loosest(gates_for(name), gates_for("bf16"))

    readback = target.readback(artifact, manifest, source) if quantized else None
    read = {n: w.to(dtype) for n, w in (readback.weights if readback else {}).items()}

    def float_weights(name: str) -> torch.Tensor:
        return source.parameter(name, dtype)

    def artifact_weights(name: str) -> torch.Tensor:
        return read[name] if name in read else float_weights(name)

    references: dict[str, Runner] = {"fidelity": EagerRunner(cfg, capacity, artifact_weights, dtype)}
    if readback is not None:
        references["quality"] = EagerRunner(cfg, capacity, float_weights, dtype)
    held = positions_held(runner)
    case = default_case(runner.capacity, runner.window, cfg.vocab_size, tokenizer, req.new_tokens, held=held,
                        positions=cfg.max_position_embeddings)
    rows_name = {"fidelity": row(fidelity_row), "quality": row(quality_row)}
    results = {name: compare(ref, runner, case, rows_name[name][1], progress) for name, ref in references.items()}
    ids, ids_source = corpus.tokens(tokenizer, cfg.vocab_size)
    positions = corpus.run(runner, references, corpus.rows(ids, runner.capacity, runner.window, held), case.chunk, progress)
    sections = {name: _section(results[name], rows_name[name][0], positions[name],
                               readback if name == "fidelity" else None,
                               ("the artifact's own weights, read back and dequantized" if readback and name == "fidelity"
                                else "the source checkpoint")) for name in references}
    if "quality" not in sections:
        sections["quality"] = {"status": "same-as-fidelity",
                               "reason": "a float artifact: the float checkpoint is its only reference"}
    failures = [{"section": name, **f} for name, part in sections.items() for f in part.get("failures", [])]
    weights_desc = ("checkpoint " + str(manifest["model"].get("path")) + " (file hashes match the manifest)"
                    if not manifest["model"]["source"].startswith("preset:") else manifest["model"]["source"])
    return {"status": "failed" if failures else "passed", "level": getattr(runner, "level", "device"),
            "reference": {"kind": "eager canonical model (torch nn.Module; no torch.export, no trace cache)",
                          "dtype": str(dtype).removeprefix("torch."), "weights": weights_desc},
            "corpus_source": {"text": "validation/data/corpus.txt", "ids": ids_source, "tokens": len(ids)},
            **sections, "failures": failures}
