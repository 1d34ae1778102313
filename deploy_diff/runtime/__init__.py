"""The torch-free runtime: NumPy schedulers, torch-compatible noise, the sampling loop, and (from the
bundle issue on) ONNX Runtime / TensorRT backends. Imports numpy only; never torch."""
