"""Runtime attributes an IR carries for the plugins: the rotary tables kept in f32 (`precise`), and
weight conversions marked as decompression.

Keep the rotary tables in f32 whatever inference precision the device picks.

OpenVINO computes a model at the device's inference precision (f16 on Intel GPUs and NPUs, and on a
CPU given an f16 hint) except nodes marked `precise` (DisableFP16Compression). Its RoPE fusion keeps
cos and sin in f32 but not the angle `position * inv_freq` upstream of them, which reaches
max_position_embeddings radians, where f16's spacing is 2 and more. Measured on openvino 2026.4 CPU,
tiny preset, f16 hint against f32: logits off by 0.06 at position 500, 0.2 at 2000, 1.0 at 4000.

A Convert from a narrow weight to f32 marked `decompression` (as NNCF marks its own) keeps the
weight narrow in memory; unmarked, the plugin folds it into an f32 copy (targets/openvino/logits.py).

The Python API cannot set these attributes, so they are written into the IR's XML the way the IR
format stores them (`<rt_info><attribute name="precise" version="0"/></rt_info>`); read_model restores them.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

PRECISE = "precise"
DECOMPRESSION = "decompression"
_KEYS = {PRECISE: ("precise_0", "DisablePrecisionConversion_0"), DECOMPRESSION: ("decompression_0", "Decompression_0")}
_ROTARY = ("Cos", "Sin")
_LEAVES = ("Constant", "Parameter")


def rotary_nodes(model: Any) -> set[str]:
    """Friendly names of every Cos and Sin node and of the non-constant nodes they depend on."""
    keep: set[str] = set()
    stack = [op for op in model.get_ordered_ops() if op.get_type_name() in _ROTARY]
    while stack:
        node = stack.pop()
        name = node.get_friendly_name()
        if name in keep or node.get_type_name() in _LEAVES:
            continue
        keep.add(name)
        stack += [node.input_value(i).get_node() for i in range(node.get_input_size())]
    return keep


def mark(xml: Path, names: dict[str, str]) -> None:
    """Add to each named layer of a saved IR its runtime attribute (layer name -> attribute), in place."""
    tree = ET.parse(xml)
    layers = [layer for layer in tree.getroot().iter("layer") if layer.get("name") in names]
    if sorted(layer.get("name") for layer in layers) != sorted(names):
        raise AssertionError(f"the IR's layers do not match the nodes to mark one to one: {sorted(names)}")
    for layer in layers:
        info = layer.find("rt_info")
        if info is None:
            info = ET.Element("rt_info")
            # The IR puts rt_info after <data> and before the ports.
            layer.insert(1 if layer.find("data") is not None else 0, info)
        ET.SubElement(info, "attribute", {"name": names[layer.get("name")], "version": "0"})
    tree.write(xml, encoding="utf-8", xml_declaration=True)


def is_marked(node: Any, attribute: str) -> bool:
    """Whether a read-back node carries the attribute (its rt_info key names vary across releases)."""
    return any(str(key) in _KEYS[attribute] for key in node.get_rt_info())
