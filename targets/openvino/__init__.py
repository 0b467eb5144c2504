"""OpenVINO target: stateful IR with ScaledDotProductAttention, NNCF int8/int4, CPU/GPU/NPU/AUTO."""

from targets.openvino.target import OpenVinoTarget

__all__ = ["OpenVinoTarget"]
