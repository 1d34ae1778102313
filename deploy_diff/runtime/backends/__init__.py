"""Runner backends: one class each, all callable as ``runner(sample, timestep, class_labels) -> output``.

- ``onnxruntime.OnnxRuntimeRunner``: ONNX Runtime (CPU or CUDA).
- ``tensorrt.TensorRTRunner``: a TensorRT engine (``tensorrt`` and ``cuda-python`` imported lazily).

Import the submodule you need; this package imports nothing itself, so neither onnxruntime nor TensorRT is
loaded until used.
"""
