"""One ``precision=`` vocabulary across backends: what each backend computes in, ``backend="auto"``, what runners
report, and the refusal of every other combination (naming what that backend supports)."""

import sys

import pytest

from deploy_diff.runtime import Pipeline
from deploy_diff.runtime.backends import PRECISIONS, SUPPORTED_PRECISIONS, check_precision
from deploy_diff.runtime.backends.tensorrt import engine_precision
from deploy_diff.runtime.pipeline import BACKENDS, select_backend


def test_the_supported_combinations_are_the_issues():
    assert PRECISIONS == ("fp32", "fp16", "bf16")
    assert SUPPORTED_PRECISIONS == {
        "onnxruntime": ("fp32", "fp16"),
        "tensorrt": ("fp32", "fp16"),
        "openvino": ("fp32", "bf16"),
    }
    assert set(BACKENDS) == {*SUPPORTED_PRECISIONS, "auto"}


@pytest.mark.parametrize("backend", sorted(SUPPORTED_PRECISIONS))
@pytest.mark.parametrize("precision", PRECISIONS)
def test_every_other_combination_is_a_value_error_listing_the_supported_ones(backend, precision):
    supported = SUPPORTED_PRECISIONS[backend]
    if precision in supported:
        assert check_precision(backend, precision) == precision
        return
    with pytest.raises(ValueError) as info:
        check_precision(backend, precision)
    message = str(info.value)
    assert f"the {backend} backend supports precision {list(supported)}; got {precision!r}" in message


@pytest.mark.parametrize("precision", ["int8", "FP32", "", None, 16])
def test_unknown_precisions_are_refused(precision):
    with pytest.raises(ValueError, match=r"precision must be one of \['fp32', 'fp16', 'bf16'\]"):
        check_precision("onnxruntime", precision)


def test_auto_never_chooses_a_reduced_precision_itself(monkeypatch):
    pytest.importorskip("openvino")
    assert select_backend("auto", "cpu", "fp32") == "openvino"
    assert select_backend("auto", "cpu", "bf16") == "openvino"
    assert select_backend("auto", "cpu", "fp16") == "onnxruntime"  # OpenVINO does not run the fp16 graph
    assert select_backend("auto", "cuda", "fp32") == "onnxruntime"
    assert select_backend("auto", "cuda:1", "fp16") == "onnxruntime"
    # ONNX Runtime's own options (providers=, cuda_graph=) make auto pick ONNX Runtime, installed OpenVINO or not
    assert select_backend("auto", "cpu", "fp32", onnxruntime_options=True) == "onnxruntime"
    monkeypatch.setitem(sys.modules, "openvino", None)
    assert select_backend("auto", "cpu", "fp32") == "onnxruntime"
    with pytest.raises(ValueError, match="onnxruntime backend supports precision"):
        select_backend("auto", "cpu", "bf16")  # bf16 without OpenVINO: refused, not computed in fp32


@pytest.mark.parametrize(
    "args, match",
    [
        (("openvino", "cuda", "fp32"), "supports device 'cpu' only"),
        (("tensorrt", "cpu", "bf16"), "tensorrt backend supports precision"),
        (("onnx", "cpu", "fp32"), "backend must be one of"),
        (("auto", "tpu", "fp32"), "device must be"),
    ],
)
def test_select_backend_refusals(args, match):
    with pytest.raises(ValueError, match=match):
        select_backend(*args)


def test_onnxruntime_runners_report_their_graphs_precision(diffusers_bundle):
    assert Pipeline.from_bundle(diffusers_bundle).precision == "fp32"
    fp16 = Pipeline.from_bundle(diffusers_bundle, precision="fp16")
    assert fp16.precision == fp16.runner.precision == "fp16"
    with pytest.raises(ValueError, match="onnxruntime backend supports precision"):
        Pipeline.from_bundle(diffusers_bundle, precision="bf16")


def test_engine_file_names_state_their_precision():
    assert engine_precision("engines/nvidia-h100_trt10.3.0_fp16_b1-8-64.plan") == "fp16"
    assert engine_precision("nvidia-a10g_trt11.0.0_fp32_b4-4-4.plan") == "fp32"
    assert engine_precision("my.plan") is None


def test_tensorrt_takes_the_engine_of_the_precision_asked_for_or_refuses(diffusers_bundle, tmp_path):
    import json
    import shutil

    from deploy_diff.runtime.bundle import BundleError, sha256_file

    bundle = tmp_path / "bundle"
    shutil.copytree(diffusers_bundle, bundle)
    engine = bundle / "engines" / "gpu_trt10.3.0_fp32_b1-1-8.plan"
    engine.parent.mkdir()
    engine.write_bytes(b"an engine is never opened here")
    manifest = json.loads((bundle / "deploy_diff.json").read_text())
    name = engine.relative_to(bundle).as_posix()
    manifest["files"][name] = {"sha256": sha256_file(engine), "bytes": engine.stat().st_size}
    manifest["engines"] = [{"file": name, "precision": "fp32"}]
    (bundle / "deploy_diff.json").write_text(json.dumps(manifest))
    # no fp16 engine: refused up front, never another precision in its place (TensorRT is not needed to say so)
    with pytest.raises(BundleError, match=r"has no fp16 TensorRT engine; it has \['fp32'\]"):
        Pipeline.from_bundle(bundle, backend="tensorrt", precision="fp16")
    with pytest.raises(ValueError, match="tensorrt backend supports precision"):
        Pipeline.from_bundle(bundle, backend="tensorrt", precision="bf16")
