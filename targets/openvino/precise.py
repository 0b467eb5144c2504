"""Keep the rotary tables in f32 whatever inference precision the device picks.

OpenVINO computes a model at the device's inference precision (f16 on Intel GPUs and NPUs, and on a
CPU given an f16 hint) except nodes marked `precise` (DisableFP16Compression). Its RoPE fusion keeps
cos and sin in f32 but not the angle `position * inv_freq` upstream of them, which reaches
max_position_embeddings radians, where f16's spacing is 2 and more. Measured on openvino 2026.4 CPU,
tiny preset, f16 hint against f32: logits off by 0.06 at position 500, 0.2 at 2000, 1.0 at 4000.

The Python API cannot set that attribute, so it is written into the IR's XML the way the IR format
stores it (`<rt_info><attribute name="precise" version="0"/></rt_info>`); read_model restores it.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

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


def mark_precise(xml: Path, names: set[str]) -> None:
    """Add the `precise` runtime attribute to each named layer of a saved IR, in place."""
    tree = ET.parse(xml)
    layers = [layer for layer in tree.getroot().iter("layer") if layer.get("name") in names]
    if sorted(layer.get("name") for layer in layers) != sorted(names):
        raise AssertionError(f"the IR's layers do not match the rotary nodes one to one: {sorted(names)}")
    for layer in layers:
        info = layer.find("rt_info")
        if info is None:
            info = ET.Element("rt_info")
            # The IR puts rt_info after <data> and before the ports.
            layer.insert(1 if layer.find("data") is not None else 0, info)
        ET.SubElement(info, "attribute", {"name": "precise", "version": "0"})
    tree.write(xml, encoding="utf-8", xml_declaration=True)


def is_precise(node: Any) -> bool:
    """Whether a read-back node carries the attribute (its rt_info key names vary across releases)."""
    return any(str(key) in ("precise_0", "DisablePrecisionConversion_0") for key in node.get_rt_info())
