"""Bind real weights into the converted model, one tensor at a time.

Conversion left every weight as a Parameter named ``weight:<canonical name>``. Each is replaced by a
Constant that owns a copy of the streamed tensor, and the tensor is dropped before the next one is
read, so the peak is the model's constants plus one tensor in flight (measured in the README).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from targets.openvino.convert import WEIGHT_PREFIX

Progress = Callable[[str, float], None]


def to_constant(tensor: torch.Tensor) -> object:
    """An OpenVINO Constant holding its own copy of tensor (bf16 kept as bf16)."""
    import openvino as ov

    tensor = tensor.detach().contiguous()
    if tensor.dtype == torch.bfloat16:
        data = ov.Tensor(tensor.view(torch.int16).numpy(), list(tensor.shape), ov.Type.bf16)
    else:
        data = ov.Tensor(tensor.numpy())
    return ov.op.Constant(data, shared_memory=False)


def weight_parameters(model: object) -> dict[str, object]:
    """Canonical weight name -> its Parameter node, for every weight still unbound."""
    found = {}
    for param in model.get_parameters():
        name = param.output(0).get_any_name()
        if name.startswith(WEIGHT_PREFIX):
            found[name.removeprefix(WEIGHT_PREFIX)] = param
    return found


def bind(model: object, lookup: Callable[[str], torch.Tensor], progress: Progress) -> int:
    """Replace each weight Parameter with a Constant of lookup(name); returns the bytes bound."""
    params = weight_parameters(model)
    total = 0
    for i, (name, param) in enumerate(params.items()):
        tensor = lookup(name)
        const = to_constant(tensor)
        total += tensor.numel() * tensor.element_size()
        del tensor
        const.output(0).get_tensor().set_names({name})
        param.output(0).replace(const.output(0))
        model.remove_parameter(param)
        progress(f"weights {name}", (i + 1) / len(params))
    model.validate_nodes_and_infer_types()
    return total


def weight_bytes(model: object) -> int:
    """Bytes held by the model's Constants (what save_model writes to the .bin, before dedup)."""
    return sum(int(np.prod(op.get_output_shape(0), dtype=np.int64)) * op.get_output_element_type(0).bitwidth // 8
               for op in model.get_ops() if op.get_type_name() == "Constant")
