"""ONNX Runtime contrib-op schemas for onnxscript, taken from ORT's own operator registry.

onnxscript (and so torch.onnx's custom translations) needs an ``onnx.defs.OpSchema`` to call an
op; the ``com.microsoft`` ops are registered in onnxruntime, not in onnx. Converting ORT's schema
keeps the inputs, attributes and type constraints exactly those of the installed runtime.
"""

from __future__ import annotations

import functools

import onnx.defs
import onnxscript
from onnxruntime.capi import onnxruntime_pybind11_state as ort_c

MS_DOMAIN = "com.microsoft"
_Option = onnx.defs.OpSchema.FormalParameterOption


@functools.cache
def ort_schema(name: str, domain: str = MS_DOMAIN) -> onnx.defs.OpSchema:
    """The installed onnxruntime's schema of domain::name, as an onnx OpSchema."""
    found = [s for s in ort_c.get_all_operator_schema() if s.name == name and s.domain == domain]
    if not found:
        raise LookupError(f"onnxruntime has no operator {domain}::{name}")
    schema = max(found, key=lambda s: s.since_version)

    def param(p: object) -> onnx.defs.OpSchema.FormalParameter:
        return onnx.defs.OpSchema.FormalParameter(p.name, p.typeStr, p.description,  # type: ignore[attr-defined]
                                                  param_option=_Option.__members__[p.option.name],  # type: ignore[attr-defined]
                                                  is_homogeneous=p.isHomogeneous)  # type: ignore[attr-defined]

    attributes = [onnx.defs.OpSchema.Attribute(a.name, onnx.defs.OpSchema.AttrType.__members__[a.type.name],
                                               a.description, required=a.required)
                  for a in schema.attributes.values()]
    return onnx.defs.OpSchema(schema.name, schema.domain, schema.since_version, "",
                              inputs=[param(p) for p in schema.inputs],
                              outputs=[param(p) for p in schema.outputs],
                              type_constraints=[(t.type_param_str, list(t.allowed_type_strs), "")
                                                for t in schema.type_constraints],
                              attributes=attributes)


def ort_op(name: str) -> onnxscript.values.Op:
    """An onnxscript op for com.microsoft::name, callable inside a translation function."""
    return onnxscript.values.Op(onnxscript.values.Opset(MS_DOMAIN, 1), name, ort_schema(name))
