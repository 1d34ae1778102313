"""TensorRT engine builds across TensorRT 10 and 11, TF32, engine validation against ONNX Runtime, and the raw
stream handle of cuda-python 13, all against the fakes of ``_trt_fakes`` (the real ONNX Runtime runs the
reference graph)."""

import json

import numpy as np
import pytest
from _trt_fakes import NativeStream, fake_backend, fake_builder, install_fake_cuda, tiny_onnx

pytest.importorskip("onnx")

from deploy_diff.export import tensorrt as export_trt  # noqa: E402
from deploy_diff.export.tensorrt import build_bundle_engine, build_engine, validate_engine  # noqa: E402
from deploy_diff.export.validate import ValidationError  # noqa: E402
from deploy_diff.runtime.backends.tensorrt import stream_handle  # noqa: E402


@pytest.fixture
def fake_trt(monkeypatch):
    """Install a fake TensorRT of ``version`` that builds and runs an engine computing ``scale * x + t`` over
    batches 1..4; return what the builder saw and the batch sizes the engine ran."""
    monkeypatch.setattr(export_trt, "gpu_name", lambda device_id=0: "NVIDIA Fake GPU")

    def make(version, scale=2.0, flavour="cuda-python 13"):
        trt, seen = fake_builder({"sample": (-1, 1, 4, 4), "timestep": (-1,)}, version=version)
        run_trt, cuda, _, calls = fake_backend(1, 4, scale=scale, native_handles=flavour == "cuda-python 13")
        for name in ("Runtime", "TensorIOMode", "DataType"):
            setattr(trt, name, getattr(run_trt, name))
        install_fake_cuda(monkeypatch, trt, cuda, flavour)
        return seen, calls

    return make


def _build(path, out, **kwargs):
    return build_engine(path, out, min_batch=1, opt_batch=2, max_batch=4, log=lambda m: None, **kwargs)


def test_tensorrt_11_builds_fp16_from_the_fp16_graph_without_precision_flags(fake_trt, tmp_path):
    seen, _ = fake_trt("11.1.0")
    plan = _build(tiny_onnx(tmp_path / "unet.fp16.onnx", fp16=True), tmp_path / "e", fp16=True)
    assert plan.name == "nvidia-fake-gpu_trt11.1.0_fp16_b1-2-4.plan"
    assert seen["flags"] == [] and seen["cleared"] == ["tf32"]  # strongly typed: the graph decides; TF32 off
    facts = json.loads(plan.with_suffix(".json").read_text())
    assert facts["precision"] == "fp16" and facts["tf32"] is False and facts["onnx"] == "unet.fp16.onnx"
    assert facts["validation"]["tolerance"] == 2e-2 and facts["validation"]["max_error"] < 2e-2


@pytest.mark.parametrize("kwargs", [{"fp16": True}, {"bf16": True}])
def test_tensorrt_11_refuses_reduced_precision_from_an_fp32_graph(fake_trt, tmp_path, kwargs):
    seen, _ = fake_trt("11.0.0")
    with pytest.raises(ValueError, match="strongly typed.*unet.fp16.onnx"):
        _build(tiny_onnx(tmp_path / "unet.onnx"), tmp_path / "e", **kwargs)
    assert not (tmp_path / "e").exists() and seen["flags"] == []


def test_tensorrt_11_bf16_needs_a_bf16_graph(fake_trt, tmp_path):
    fake_trt("11.0.0")
    with pytest.raises(ValueError, match="bf16 needs an ONNX graph already in bf16"):
        _build(tiny_onnx(tmp_path / "unet.fp16.onnx", fp16=True), tmp_path / "e", bf16=True)


@pytest.mark.parametrize(
    "kwargs, flags, cleared, tolerance",
    [
        ({"fp16": True}, ["fp16"], ["tf32"], 2e-2),
        ({"bf16": True}, ["bf16"], ["tf32"], 5e-2),
        ({}, [], ["tf32"], 1e-4),
        ({"tf32": True}, ["tf32"], [], 2e-2),
    ],
)
def test_tensorrt_10_keeps_the_precision_flags_and_states_tf32(fake_trt, tmp_path, kwargs, flags, cleared, tolerance):
    seen, _ = fake_trt("10.8.0")
    graph = tiny_onnx(tmp_path / ("unet.fp16.onnx" if kwargs.get("fp16") else "unet.onnx"), fp16=kwargs.get("fp16"))
    plan = _build(graph, tmp_path / "e", **kwargs)
    assert seen["flags"] == flags and seen["cleared"] == cleared
    facts = json.loads(plan.with_suffix(".json").read_text())
    assert facts["tf32"] is bool(kwargs.get("tf32")) and facts["tensorrt_version"] == "10.8.0"
    assert facts["batch"] == {"min": 1, "opt": 2, "max": 4}
    assert facts["validation"]["tolerance"] == tolerance
    assert [c["batch"] for c in facts["validation"]["cases"]] == [1, 2, 4]


def test_an_engine_that_disagrees_with_onnxruntime_is_not_written(fake_trt, tmp_path):
    _, calls = fake_trt("10.8.0", scale=3.0)  # the engine computes 3x + t, the graph 2x + t
    with pytest.raises(ValidationError, match="engine validation failed.*fp32 engine.*discarded"):
        _build(tiny_onnx(tmp_path / "unet.onnx"), tmp_path / "e")
    assert calls == [1, 2, 4]  # it ran every validation batch before failing
    assert not (tmp_path / "e").exists()  # no plan, no facts, no timing cache


def test_validation_runs_both_cuda_python_layouts(fake_trt, tmp_path):
    for flavour in ("cuda.cudart", "cuda.bindings.runtime", "cuda-python 13"):
        _, calls = fake_trt("11.0.0", flavour=flavour)
        graph = tiny_onnx(tmp_path / "unet.onnx")
        report = validate_engine(b"engine", graph, batches=(3, 1), num_train_timesteps=10)
        assert calls == [3, 1] and report["max_error"] < 1e-6
        assert report["cases"][0]["timesteps"][0] == 0.0 and report["cases"][0]["timesteps"][-1] == 9.0
        assert report["metric"] == "max|engine - onnxruntime| / max(1, max|onnxruntime|)"


def test_build_bundle_engine_picks_the_graph_of_its_precision(fake_trt, tmp_path):
    staging = tmp_path / "staging"
    staging.mkdir()
    tiny_onnx(staging / "unet.onnx")
    tiny_onnx(staging / "unet.fp16.onnx", fp16=True)
    for fp16, version in ((True, "11.0.0"), (False, "11.0.0"), (True, "10.8.0")):
        seen, _ = fake_trt(version)
        entry = build_bundle_engine(staging, fp16=fp16, static_batch=None, max_batch=4, log=lambda m: None)
        precision = "fp16" if fp16 else "fp32"
        assert seen["parsed"] == str(staging / ("unet.fp16.onnx" if fp16 else "unet.onnx"))
        assert entry["file"] == f"engines/nvidia-fake-gpu_trt{version}_{precision}_b1-1-4.plan"
        assert (staging / entry["file"]).is_file()
        assert entry["precision"] == precision and entry["tf32"] is False and entry["tensorrt_version"] == version
        assert entry["validation"]["max_error"] <= entry["validation"]["tolerance"]


def test_stream_handle_uses_the_cuda_python_13_accessor(fake_trt, monkeypatch):
    import sys

    fake_trt("11.0.0", flavour="cuda-python 13")
    assert stream_handle(NativeStream(1234)) == 1234  # int() on it would fail
    assert stream_handle(55) == 55  # not a cuda-python object: int()
    monkeypatch.setitem(sys.modules, "cuda.bindings.utils", None)  # 12.x without the accessor
    assert stream_handle(np.int64(77)) == 77
