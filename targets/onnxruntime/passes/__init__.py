"""Graph passes over the exported ONNX IR model, each a function (model, ...) -> None, in place."""
