"""Validation: the exported graph, run by ONNX Runtime, against the torch module on the same random inputs.

Always part of an export. The error of one case is :func:`~deploy_diff.runtime._numeric.relative_error` of the ONNX
output against torch's (``max|onnx - torch| / max(1, max|torch|)``); the export fails when any case exceeds the
tolerance (fp32 1e-4, fp16 2e-2), and the manifest records them all. An output with non-finite values where torch's
is finite (an fp16 overflow: activations above 65504) fails with a message saying so (``ValidationError.overflow``).

:func:`validate` checks a UNet :class:`~.sources.ExportSource` on random samples, timesteps and labels;
:func:`compare_graph` is the rule itself, for any module and graph on given inputs (the text-to-image components).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from ..runtime._numeric import RELATIVE_ERROR_METRIC, relative_error
from .sources import ExportSource

__all__ = ["TOLERANCES", "ValidationError", "check_graph", "compare_graph", "validate"]

TOLERANCES = {"fp32": 1e-4, "fp16": 2e-2}


class ValidationError(RuntimeError):
    """The ONNX graph does not reproduce the torch model within tolerance (or is not a valid graph). ``overflow``:
    the graph's output held non-finite values where torch's did not (an fp16 overflow)."""

    def __init__(self, message: str, overflow: bool = False):
        super().__init__(message)
        self.overflow = overflow


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
    return compare_graph(
        src.module,
        graph,
        precision,
        _cases(src, batch_sizes, num_train_timesteps, seed),
        describe=lambda inputs: {
            "batch": int(inputs["sample"].shape[0]),
            "timesteps": [round(float(v), 4) for v in inputs["timestep"]],
        },
        tolerance=tolerance,
        providers=providers,
    )


def _session(graph: Path, providers: Sequence[str]):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(graph), opts, providers=list(providers))
    except Exception as e:  # onnxruntime raises its own exception types
        raise ValidationError(f"ONNX Runtime cannot load {graph.name}: {str(e).splitlines()[0]}") from None


def _where(case: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in case.items() if k not in ("max_error", "max_abs_torch", "non_finite"))


def compare_graph(
    module: torch.nn.Module,
    graph: Path,
    precision: str,
    cases: Iterable[dict[str, torch.Tensor]],
    describe: Callable[[dict[str, torch.Tensor]], dict[str, Any]],
    tolerance: float | None = None,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    consequence: str = "the export was discarded",
) -> dict[str, Any]:
    """Run ``graph`` in ONNX Runtime and ``module(*inputs.values())`` in torch on each of ``cases`` (input name ->
    tensor, in the module's argument order); return the report (``tolerance``, ``max_error``, ``metric``,
    ``provider``, and per case ``describe(inputs)`` with its ``max_error`` and ``max_abs_torch``), or raise
    :class:`ValidationError` naming the worst case when one exceeds the tolerance (``TOLERANCES[precision]``
    unless ``tolerance``) or the graph's output is non-finite where torch's is not; the message ends with
    ``consequence`` (what the caller does about it)."""
    tol = TOLERANCES[precision] if tolerance is None else tolerance
    session = _session(graph, providers)
    names = [i.name for i in session.get_inputs()]
    report_cases = []
    for inputs in cases:
        with torch.no_grad():
            expected = module(*inputs.values()).float().numpy()
        feeds = {k: v.numpy() for k, v in inputs.items() if k in names}
        got = session.run(None, feeds)[0]
        case = dict(describe(inputs))
        if got.dtype != np.float32:
            raise ValidationError(f"{graph.name}: the output is {got.dtype}; graphs give float32 (fp16 ones too)")
        if got.shape != expected.shape:
            raise ValidationError(
                f"{graph.name}: output shape {got.shape} != torch's {expected.shape} at {_where(case)}"
            )
        finite = bool(np.isfinite(got).all())
        case["max_error"] = relative_error(got, expected) if finite else float("inf")
        case["max_abs_torch"] = float(np.abs(expected).max())
        if not finite and np.isfinite(expected).all():
            case["non_finite"] = True
        report_cases.append(case)
    worst = max(report_cases, key=lambda c: c["max_error"])
    report = {
        "tolerance": tol,
        "max_error": worst["max_error"],
        "cases": report_cases,
        "metric": RELATIVE_ERROR_METRIC,
        "provider": list(providers)[0],
    }
    if worst.get("non_finite"):
        raise ValidationError(
            f"validation failed: the {precision} graph {graph.name} gives non-finite values where torch's output is "
            f"finite (max |torch| {worst['max_abs_torch']:.3g}) at {_where(worst)}: an activation overflows "
            f"{precision}{' (above 65504)' if precision == 'fp16' else ''}; {consequence}",
            overflow=True,
        )
    if not worst["max_error"] <= tol:
        raise ValidationError(
            f"validation failed: the {precision} graph differs from the torch model by {worst['max_error']:.3g} "
            f"(tolerance {tol:g}) at {_where(worst)}; {consequence}. A graph the exporter mistranslated, "
            "or weights changed during export, are the usual causes"
        )
    return report
