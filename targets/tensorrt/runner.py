"""Runners for a TensorRT artifact: the engine on CUDA (level `device`), or its ONNX in ONNX Runtime
(level `onnx-proxy`) where no engine could be built."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from targets.tensorrt.onnx_graph import MODEL_FILE
from targets.tensorrt.plan import DECODE, PREFILL

_TORCH_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


class OnnxProxyRunner:
    """The engine-ready ONNX on ONNX Runtime's CPU EP, caches as explicit numpy inputs/outputs."""

    level = "onnx-proxy"

    def __init__(self, artifact: Path, capacity: int, window: int | None, layers: int,
                 cache_shape: tuple[int, int], dtype: str, threads: int = 0,
                 provider: str = "CPUExecutionProvider") -> None:
        import onnxruntime as ort

        from targets.onnxruntime.runner import check_external_data
        from targets.tensorrt.onnx_graph import DATA_FILE

        check_external_data(artifact / MODEL_FILE, DATA_FILE)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.provider = provider
        self.session = ort.InferenceSession(str(artifact / MODEL_FILE), options, providers=[provider])
        self.capacity, self.window, self.layers = capacity, window, layers
        self.cache_shape, self.dtype = cache_shape, np.dtype(dtype)
        self.threads = threads or None
        self.caches: dict[str, np.ndarray] = {}

    def reset(self, batch_size: int) -> None:
        heads, dim = self.cache_shape
        self.caches = {f"past_{k}.{i}": np.zeros((batch_size, heads, self.capacity, dim), self.dtype)
                       for k in ("key", "value") for i in range(self.layers)}

    def step(self, input_ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        names = [o.name for o in self.session.get_outputs()]
        outs = dict(zip(names, self.session.run(None, {"input_ids": input_ids, "positions": positions,
                                                        **self.caches})))
        self.caches = {n.replace("present_", "past_"): v for n, v in outs.items() if n.startswith("present_")}
        return outs["logits"].astype(np.float32)

    def describe_device(self) -> str:
        return f"ONNX Runtime {self.provider} running the TensorRT-ready ONNX (no engine here)"


class EngineRunner:
    """Deserialized engine, one execution context per profile, caches resident on the GPU.

    Each step writes the new caches into the second of two device buffers and then swaps them, so
    the cache never leaves the GPU and is never copied."""

    level = "device"

    def __init__(self, artifact: Path, manifest: dict[str, Any]) -> None:
        import tensorrt as trt
        import torch

        from targets.tensorrt.engine import ENGINE_FILE, check_compatible

        target, cfg = manifest["target"], manifest["model"]["config"]
        check_compatible(target["engine_build"])
        self.torch, self.trt = torch, trt
        self.capacity, self.window = manifest["cache"]["capacity"], manifest["cache"]["window"]
        self.layers, self.heads, self.dim = cfg["num_hidden_layers"], cfg["num_key_value_heads"], cfg["head_dim"]
        self.vocab = cfg["vocab_size"]
        self.dtype = getattr(torch, _TORCH_DTYPES[target["precision"]])
        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(
            (artifact / ENGINE_FILE).read_bytes())
        self.stream = torch.cuda.Stream()
        self.contexts = []
        for profile in (PREFILL, DECODE):
            context = self.engine.create_execution_context()
            context.set_optimization_profile_async(profile, self.stream.cuda_stream)
            self.contexts.append(context)
        self.buffers: list[dict[str, Any]] = []

    def reset(self, batch_size: int) -> None:
        shape = (batch_size, self.heads, self.capacity, self.dim)
        self.buffers = [{f"{k}.{i}": self.torch.zeros(shape, dtype=self.dtype, device="cuda")
                         for k in ("key", "value") for i in range(self.layers)} for _ in range(2)]

    def step(self, input_ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        torch = self.torch
        context = self.contexts[DECODE if input_ids.shape[1] == 1 else PREFILL]
        ids = torch.from_numpy(np.ascontiguousarray(input_ids)).cuda()
        pos = torch.from_numpy(np.ascontiguousarray(positions)).cuda()
        logits = torch.empty((*input_ids.shape, self.vocab), dtype=torch.float32, device="cuda")
        past, present = self.buffers
        for name, tensor in (("input_ids", ids), ("positions", pos)):
            context.set_input_shape(name, tuple(tensor.shape))
            context.set_tensor_address(name, tensor.data_ptr())
        for name, tensor in past.items():
            context.set_input_shape(f"past_{name}", tuple(tensor.shape))
            context.set_tensor_address(f"past_{name}", tensor.data_ptr())
        for name, tensor in present.items():
            context.set_tensor_address(f"present_{name}", tensor.data_ptr())
        context.set_tensor_address("logits", logits.data_ptr())
        if not context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        self.stream.synchronize()
        self.buffers = [present, past]
        return logits.cpu().numpy()

    def describe_device(self) -> str:
        torch = self.torch
        return f"{torch.cuda.get_device_name()} (SM {'.'.join(map(str, torch.cuda.get_device_capability()))}), " \
               f"TensorRT {self.trt.__version__}"

    def device_memory_mb(self) -> float:
        return self.torch.cuda.max_memory_allocated() / 2**20
