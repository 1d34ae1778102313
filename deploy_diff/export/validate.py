"""Validation: the exported graph, run by ONNX Runtime, against the torch module on the same random inputs.

Always part of an export. The error of one case is :func:`~deploy_diff.runtime._numeric.relative_error` of the ONNX
output against torch's (``max|onnx - torch| / max(1, max|torch|)``); the export fails when any case exceeds the
tolerance (fp32 1e-4, fp16 2e-2), and the manifest records them all.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from ..runtime._numeric import RELATIVE_ERROR_METRIC, relative_error
from .sources import ExportSource

__all__ = ["TOLERANCES", "ValidationError", "check_graph", "validate"]

TOLERANCES = {"fp32": 1e-4, "fp16": 2e-2}


class ValidationError(RuntimeError):
    """The ONNX graph does not reproduce the torch model within tolerance (or is not a valid graph)."""


def check_graph(path: Path) -> None:
    """``onnx.checker`` with full shape inference; a path, so graphs with external data work too."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ValidationError(f"{path.name} fails onnx.checker: {str(e).splitlines()[0]}") from None


def _cases(src: ExportSource, batch_sizes: Sequence[int], num_train_timesteps: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    h, w = src.sample_size
    for batch in batch_sizes:
        x = torch.randn(batch, src.in_channels, h, w, generator=g)
        # the ends of the schedule, plus fractional timesteps (Euler/Heun feed floats)
        t = torch.rand(batch, generator=g) * (num_train_timesteps - 1)
        t[0] = 0.0
        if batch > 1:
            t[-1] = float(num_train_timesteps - 1)
        inputs: dict[str, torch.Tensor] = {"sample": x, "timestep": t}
        if src.conditional:
            high = src.num_classes + (1 if src.null_class_label is not None else 0)
            labels = torch.randint(0, high, (batch,), generator=g)
            if src.null_class_label is not None:
                labels[-1] = src.null_class_label
            inputs["class_labels"] = labels
        yield inputs


def validate(
    src: ExportSource,
    graph: Path,
    precision: str,
    batch_sizes: Sequence[int],
    num_train_timesteps: int = 1000,
    seed: int = 0,
    tolerance: float | None = None,
    providers: Sequence[str] = ("CPUExecutionProvider",),
) -> dict[str, Any]:
    """Run ``graph`` in ONNX Runtime and ``src.module`` in torch on the same inputs; return the measured
    errors, or raise :class:`ValidationError` naming the worst case when one exceeds the tolerance."""
    import onnxruntime as ort

    tol = TOLERANCES[precision] if tolerance is None else tolerance
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(graph), opts, providers=list(providers))
    except Exception as e:  # onnxruntime raises its own exception types
        raise ValidationError(f"ONNX Runtime cannot load {graph.name}: {str(e).splitlines()[0]}") from None
    names = [i.name for i in session.get_inputs()]
    cases = []
    for inputs in _cases(src, batch_sizes, num_train_timesteps, seed):
        with torch.no_grad():
            expected = src.module(*inputs.values()).float().numpy()
        feeds = {k: v.numpy() for k, v in inputs.items() if k in names}
        got = session.run(None, feeds)[0]
        if got.shape != expected.shape:
            raise ValidationError(
                f"{graph.name}: output shape {got.shape} != torch's {expected.shape} at batch {len(inputs['sample'])}"
            )
        finite = bool(np.isfinite(got).all())
        err = relative_error(got, expected) if finite else float("inf")
        cases.append(
            {
                "batch": int(inputs["sample"].shape[0]),
                "timesteps": [round(float(v), 4) for v in inputs["timestep"]],
                "max_error": err,
                "max_abs_torch": float(np.abs(expected).max()),
            }
        )
    worst = max(cases, key=lambda c: c["max_error"])
    report = {
        "tolerance": tol,
        "max_error": worst["max_error"],
        "cases": cases,
        "metric": RELATIVE_ERROR_METRIC,
        "provider": list(providers)[0],
    }
    if not worst["max_error"] <= tol:
        raise ValidationError(
            f"validation failed: the {precision} graph differs from the torch model by {worst['max_error']:.3g} "
            f"(tolerance {tol:g}) at batch {worst['batch']}, timesteps {worst['timesteps']}; the export was "
            "discarded. A graph the exporter mistranslated, or weights changed during export, are the usual causes"
        )
    return report
