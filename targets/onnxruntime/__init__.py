"""ONNX Runtime target: target.py (the contract), lower.py and passes/ (the graph), runner.py.

Kept import-free so the runner can be loaded without torch (benchmarks/ runs it in workers)."""
