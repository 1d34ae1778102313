"""Graph rewrites (deploy_diff/export/optimize.py): the decomposed attention of a dynamo-exported
UNet2DModel becomes com.microsoft.MultiHeadAttention, and ONNX Runtime still reproduces torch within 1e-4."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from _bundles import diffusers_unet

from deploy_diff.export.onnx import export_onnx
from deploy_diff.export.optimize import count_fused_attention, optimize_graph
from deploy_diff.export.sources import _DiffusersModule
from deploy_diff.runtime._numeric import relative_error

FP32_TOL = 1e-4


def run(model: onnx.ModelProto, x: torch.Tensor, t: torch.Tensor) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {"sample": x.numpy(), "timestep": t.numpy()})[0]


def export(attention: bool):
    # out_scale=1: the full-size output, so the attention's share of it is not shrunk away; without attention
    # the mid block's goes too (add_attention)
    unet = diffusers_unet(attention=attention, out_scale=1.0, add_attention=attention)
    module = _DiffusersModule(unet, conditional=False).eval()
    example = (torch.randn(2, 1, 8, 8), torch.tensor([10.0, 500.0]))
    return module, export_onnx(module, example, ["sample", "timestep"])


@pytest.fixture(scope="module")
def attention_unet():
    return export(attention=True)


def test_attention_is_fused_and_matches_torch(attention_unet):
    module, graph = attention_unet
    before = graph.SerializeToString()
    fused = optimize_graph(graph)
    assert graph.SerializeToString() == before  # the input is left alone
    # AttnDownBlock2D (1) + the mid block (1) + AttnUpBlock2D (layers_per_block + 1 = 2); 64 channels / 8 = 8 heads
    assert count_fused_attention(fused) == 4
    assert not any(n.op_type == "Softmax" for n in fused.graph.node)
    assert {n.attribute[0].i for n in fused.graph.node if n.op_type == "MultiHeadAttention"} == {8}
    onnx.checker.check_model(fused)
    g = torch.Generator().manual_seed(1)
    for batch in (1, 3):  # dynamic batch, other than the export's example batch
        x = torch.randn(batch, 1, 8, 8, generator=g)
        t = torch.linspace(0, 999, batch) + 0.37
        with torch.no_grad():
            expected = module(x, t).numpy()
        assert relative_error(run(fused, x, t), expected) < FP32_TOL
        assert relative_error(run(fused, x, t), run(graph, x, t)) < 1e-5


def test_rewrite_is_idempotent(attention_unet):
    once = optimize_graph(attention_unet[1])
    twice = optimize_graph(once)
    assert [n.op_type for n in twice.graph.node] == [n.op_type for n in once.graph.node]


def test_graph_without_attention_comes_back_unchanged():
    _, graph = export(attention=False)
    out = optimize_graph(graph)
    assert out is not graph
    assert out.SerializeToString() == graph.SerializeToString()
    assert count_fused_attention(out) == 0
