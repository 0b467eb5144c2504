"""Port naming and the stateful transformation of the converted model.

Stateful: each past K/V input goes through ``Gather(past, beam_idx, axis=0)`` and then becomes an
internal variable (ReadValue/Assign) via OpenVINO's make-stateful transformation. The Gather is the
pattern the CPU plugin matches to fuse SDPA with its own in-place KV cache; ``beam_idx`` is also how
a caller (OpenVINO GenAI, beam search) reorders cached rows. Each ReadValue gets an initializer of
shape [batch, kv_heads, 0, head_dim], batch taken from input_ids, so a reset state fits any batch.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from exporter.config import MistralConfig

POSITIONS = {"ring": "positions", "concat": "position_ids"}


def cache_names(cfg: MistralConfig, kind: str) -> list[str]:
    """past_key.0..L-1 then past_value.0..L-1 (kind 'past'), or present_* (kind 'present')."""
    return [f"{kind}_{kv}.{i}" for kv in ("key", "value") for i in range(cfg.num_hidden_layers)]


def name_ports(model: object, cfg: MistralConfig, layout: str) -> None:
    """Name inputs and outputs by the IO contract and pin the static cache dims."""
    import openvino as ov

    layers = cfg.num_hidden_layers
    inputs = ["input_ids", POSITIONS[layout]] + cache_names(cfg, "past")
    for port, name in zip(model.inputs[:len(inputs)], inputs):
        port.get_tensor().set_names({name})
    outputs = ["logits"] + cache_names(cfg, "present")
    if len(model.outputs) != len(outputs):
        raise AssertionError(f"expected {len(outputs)} outputs, converted model has {len(model.outputs)}")
    for port, name in zip(model.outputs, outputs):
        port.get_tensor().set_names({name})
    cache_shape = ov.PartialShape([-1, cfg.num_key_value_heads, -1, cfg.head_dim])
    for port in model.inputs[2:2 + 2 * layers]:
        port.get_node().set_partial_shape(cache_shape)
    model.validate_nodes_and_infer_types()


def add_beam_idx(model: object, cfg: MistralConfig) -> None:
    """A beam_idx [batch] i32 input, gathered into every past cache along the batch axis."""
    import openvino as ov
    from openvino import opset13

    beam_idx = opset13.parameter(ov.PartialShape([-1]), ov.Type.i32, name="beam_idx")
    beam_idx.output(0).get_tensor().set_names({"beam_idx"})
    model.add_parameters([beam_idx])
    for name in cache_names(cfg, "past"):
        port = model.input(name)
        consumers = port.get_target_inputs()
        gather = opset13.gather(port, beam_idx, opset13.constant(np.int64(0)))
        for consumer in consumers:
            consumer.replace_source_output(gather.output(0))
    model.validate_nodes_and_infer_types()


def make_stateful(model: object, cfg: MistralConfig) -> None:
    """past_* inputs and present_* outputs become variables, each with a zero-length initializer."""
    from openvino import opset13
    from openvino._offline_transformations import apply_make_stateful_transformation

    apply_make_stateful_transformation(model, dict(zip(cache_names(cfg, "past"), cache_names(cfg, "present"))))
    batch = opset13.gather(opset13.shape_of(model.input("input_ids"), output_type="i64"),
                           opset13.constant(np.array([0], dtype=np.int64)), opset13.constant(np.int64(0)))
    tail = opset13.constant(np.array([cfg.num_key_value_heads, 0, cfg.head_dim], dtype=np.int64))
    shape = opset13.concat([batch, tail], axis=0)
    for op in model.get_ops():
        if op.get_type_name() == "ReadValue":
            zero = opset13.convert(opset13.constant(np.float32(0)), op.get_output_element_type(0))
            op.set_arguments([opset13.broadcast(zero, shape)])
    model.validate_nodes_and_infer_types()


def op_counts(model: object) -> dict[str, int]:
    """How many ops of each type the model holds (tests assert SDPA per layer, ReadValue/Assign)."""
    return dict(Counter(op.get_type_name() for op in model.get_ordered_ops()))


def name_unnamed(model: object) -> None:
    """Name every node still called by OpenVINO's per-process counter (Constant_7093) by its place in the
    graph instead, so the IR's bytes do not depend on what else the process built (a graph-cache hit
    converts nothing, a fresh build converts the whole program)."""
    for index, node in enumerate(model.get_ordered_ops()):
        if node.get_friendly_name() == node.get_name():
            node.set_friendly_name(f"{node.get_type_name()}:{index}")
