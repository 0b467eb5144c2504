"""Bind real weights into the converted model, one tensor at a time.

Conversion left every weight as a Parameter named ``weight:<canonical name>``. Each is replaced by a
Constant that owns a copy of the streamed tensor (or, for int8/int4, by its NNCF-compressed form, see
compress.py), and the tensor is dropped before the next one is read, so the peak is the model's
constants plus one tensor in flight (measured in the README).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from exporter.checkpoint import Rows
from targets.openvino.compress import TensorConfig, compressed
from targets.openvino.convert import WEIGHT_PREFIX

Progress = Callable[[str, float], None]


def to_ov_tensor(tensor: torch.Tensor) -> object:
    """An ov.Tensor over tensor's memory (bf16 kept as bf16)."""
    import openvino as ov

    tensor = tensor.detach().contiguous()
    if tensor.dtype == torch.bfloat16:
        return ov.Tensor(tensor.view(torch.int16).numpy(), list(tensor.shape), ov.Type.bf16)
    return ov.Tensor(tensor.numpy())


def to_constant(tensor: torch.Tensor) -> object:
    """An OpenVINO Constant holding its own copy of tensor."""
    import openvino as ov

    return ov.op.Constant(to_ov_tensor(tensor), shared_memory=False)


def weight_parameters(model: object) -> dict[str, object]:
    """Canonical weight name -> its Parameter node, for every weight still unbound."""
    found = {}
    for param in model.get_parameters():
        name = param.output(0).get_any_name()
        if name.startswith(WEIGHT_PREFIX):
            found[name.removeprefix(WEIGHT_PREFIX)] = param
    return found


def bind(model: object, lookup: Callable[[str], torch.Tensor], progress: Progress,
         configs: TensorConfig | None = None, rows: Callable[[str], Rows] | None = None) -> None:
    """Replace each weight Parameter with a Constant of lookup(name), or, where configs(name) gives an
    NNCF config, with the compressed form of rows(name) (read and compressed block by block; a
    tensor, lookup(name), serves too)."""
    params = weight_parameters(model)
    for i, (name, param) in enumerate(params.items()):
        config = configs(name) if configs else None
        if config is None:
            tensor = lookup(name)
            const = to_constant(tensor)
            const.set_friendly_name(name)  # NNCF's whole-model pass names what it compresses after this
            out = const.output(0)
            del tensor
        else:
            out = compressed((rows or lookup)(name), config, name, param.get_output_element_type(0))
        out.get_tensor().set_names({name})
        param.output(0).replace(out)
        model.remove_parameter(param)
        progress(f"weights {name}", (i + 1) / len(params))
    model.validate_nodes_and_infer_types()


def weight_bytes(model: object) -> int:
    """Bytes held by the model's Constants (what save_model writes to the .bin, before dedup)."""
    return sum(int(np.prod(op.get_output_shape(0), dtype=np.int64)) * op.get_output_element_type(0).bitwidth // 8
               for op in model.get_ops() if op.get_type_name() == "Constant")
