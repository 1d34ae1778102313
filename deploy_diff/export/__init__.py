"""Export room (torch + onnx): checkpoints and diffusers UNets to validated bundles. Never imported by the
runtime."""
