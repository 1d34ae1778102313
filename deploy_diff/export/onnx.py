"""torch module -> ONNX graph (torch's dynamo exporter), fp16 conversion, and saving with or without external
data."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

__all__ = [
    "DEFAULT_OPSET",
    "EXTERNAL_DATA_THRESHOLD",
    "FP16_BLOCKED_OPS",
    "MIN_OPSET",
    "convert_to_fp16",
    "export_onnx",
    "rename_dims",
    "save_onnx",
    "timestep_embedding_nodes",
]

DEFAULT_OPSET = 18  # the oldest opset torch's dynamo exporter implements natively (17 goes through a converter)
MIN_OPSET = 17
EXTERNAL_DATA_THRESHOLD = 2_000_000_000 - (64 << 20)  # protobuf's 2 GB limit, with room for the graph itself

# Kept in float32 by the fp16 conversion: normalisation and softmax (large sums, small variances), Resize (its
# scales input must stay float), and the sinusoidal timestep embedding's trigonometry.
FP16_BLOCKED_OPS = (
    "InstanceNormalization",
    "GroupNormalization",
    "LayerNormalization",
    "BatchNormalization",
    "Softmax",
    "Resize",
    "Sin",
    "Cos",
    "Exp",
    "Range",
    "Pow",
    "ReduceMean",
    "Sqrt",
)


@contextlib.contextmanager
def _quiet_exporter():
    """torch's exporter prints pages of progress and warnings; keep them unless something fails."""
    buf = io.StringIO()
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(buf):
            warnings.simplefilter("ignore")
            yield buf
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export_onnx(
    module: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    input_names: Sequence[str],
    output_name: str = "out",
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
    dynamic_shapes: dict[str, dict[int, Any]] | None = None,
) -> onnx.ModelProto:
    """Trace ``module(*example_inputs)`` into an in-memory ONNX model; the batch dimension is symbolic
    (``batch``) unless ``dynamic_batch=False``, when every shape is that of ``example_inputs``.
    ``dynamic_shapes`` (input name -> axis -> ``torch.export.Dim``), when given, says instead which dimensions
    are symbolic (name every input; ``{}`` for a static one)."""
    if opset < MIN_OPSET:
        raise ValueError(f"opset must be >= {MIN_OPSET}; got {opset}")
    if dynamic_shapes is None and dynamic_batch:
        batch = torch.export.Dim("batch", min=1, max=1 << 16)
        dynamic_shapes = {name: {0: batch} for name in input_names}
    module = module.eval()
    with _quiet_exporter() as log, torch.no_grad():
        try:
            program = torch.onnx.export(
                module,
                tuple(example_inputs),
                dynamo=True,
                input_names=list(input_names),
                output_names=[output_name],
                dynamic_shapes=dynamic_shapes,
                opset_version=opset,
                external_data=False,
                optimize=True,
                verbose=False,
            )
        except Exception as e:
            tail = log.getvalue().strip().splitlines()[-5:]
            raise RuntimeError(
                f"torch.onnx.export failed: {type(e).__name__}: {str(e).splitlines()[0]}"
                + ("\n" + "\n".join(tail) if tail else "")
            ) from e
    model = program.model_proto
    model.producer_name = "deploy-diff"
    return model


def rename_dims(model: onnx.ModelProto, names: dict[str, str]) -> onnx.ModelProto:
    """Rename the symbolic dimensions of the graph's inputs and outputs (``{"8*s0": "height"}``): the exporter names
    a derived dimension by its expression. Returns ``model``, changed in place."""
    for value in list(model.graph.input) + list(model.graph.output):
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param") and dim.dim_param in names:
                dim.dim_param = names[dim.dim_param]
    return model


def timestep_embedding_nodes(model: onnx.ModelProto, timestep_input: str = "timestep") -> list[str]:
    """Names of the nodes between the ``timestep`` input and the embedding's Sin/Cos (inclusive). In fp16 a
    timestep near 1000 rounds to a multiple of 0.5 and sin(t * f) loses its first digit, so these stay fp32."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    blocked: dict[str, None] = {}
    stack = [timestep_input]
    while stack:
        for node in consumers.get(stack.pop(), []):
            if node.name in blocked:
                continue
            blocked[node.name] = None
            if node.op_type not in ("Sin", "Cos"):
                stack.extend(node.output)
    return list(blocked)


def convert_to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """fp16 weights and activations with float32 inputs and output (``keep_io_types``), normalisation,
    softmax, Resize and the timestep embedding kept in float32 (onnxconverter-common's converter)."""
    from onnxconverter_common import float16

    for node in model.graph.node:  # the converter keys its block list by node name
        if not node.name:
            raise ValueError("every node needs a name for the fp16 conversion")
    float_outputs = {o.name for o in model.graph.output if o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = float16.convert_float_to_float16(
            model,
            keep_io_types=True,
            op_block_list=list(float16.DEFAULT_OP_BLOCK_LIST) + list(FP16_BLOCKED_OPS),
            node_block_list=timestep_embedding_nodes(model),
        )
    return _float_outputs(converted, float_outputs)


def _float_outputs(model: onnx.ModelProto, names: set[str]) -> onnx.ModelProto:
    """Make the outputs ``names`` float32 again where the converter left them float16 (it does when the output's
    node is a blocked one, e.g. a text encoder's final LayerNormalization: it casts that float32 result to float16
    for the graph output despite ``keep_io_types``): the closing Cast then casts to float32, or one is added."""
    producers = {o: n for n in model.graph.node for o in n.output}
    for out in model.graph.output:
        t = out.type.tensor_type
        if out.name not in names or t.elem_type != onnx.TensorProto.FLOAT16:
            continue
        node = producers.get(out.name)
        if node is not None and node.op_type == "Cast":
            for attr in node.attribute:
                if attr.name == "to":
                    attr.i = onnx.TensorProto.FLOAT
        else:
            inner = out.name + "_fp16"
            for n in model.graph.node:
                n.output[:] = [inner if o == out.name else o for o in n.output]
                n.input[:] = [inner if i == out.name else i for i in n.input]
            model.graph.node.append(
                onnx.helper.make_node("Cast", [inner], [out.name], name=inner + "_to_float", to=onnx.TensorProto.FLOAT)
            )
        t.elem_type = onnx.TensorProto.FLOAT
    return model


def save_onnx(
    model: onnx.ModelProto, path: str | os.PathLike, external_data_threshold: int = EXTERNAL_DATA_THRESHOLD
) -> list[Path]:
    """Write ``model`` to ``path``: one self-contained file when it is below ``external_data_threshold``
    bytes, else the graph plus ``<name>.data`` holding every tensor of 1 KiB or more. Returns the files written.
    (The caller writes into a temporary bundle folder, so a failure leaves nothing visible.)"""
    path = Path(path)
    if model.ByteSize() < external_data_threshold:
        path.write_bytes(model.SerializeToString())
        return [path]
    data_name = path.name + ".data"
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data_name,
        size_threshold=1024,
    )
    return [path, path.with_name(data_name)]
