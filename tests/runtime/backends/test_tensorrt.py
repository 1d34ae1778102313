"""TensorRT: engine names and argument checks (pure), the runner's batching against a fake TensorRT + cuda-python
(pure), and a real build-and-run where TensorRT and a GPU exist (``gpu`` marker)."""

import ast
import subprocess
import sys
import types

import numpy as np
import pytest
from _trt_fakes import fake_backend, fake_builder, install_fake_cuda, tiny_onnx

from deploy_diff.export.tensorrt import TensorRTUnavailableError, build_engine, engine_filename, require_tensorrt
from deploy_diff.runtime.backends.tensorrt import BackendUnavailableError, TensorRTRunner


@pytest.fixture
def no_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` now raises ImportError


# ---- engine names ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "gpu, want",
    [
        ("NVIDIA H100 80GB HBM3", "nvidia-h100-80gb-hbm3"),
        ("NVIDIA GeForce RTX 4090", "nvidia-geforce-rtx-4090"),
        ("  Tesla T4 (PCIe) ", "tesla-t4-pcie"),
        ("NVIDIA A100-SXM4-40GB", "nvidia-a100-sxm4-40gb"),
        ("", "gpu"),
    ],
)
def test_engine_filename_slugs_the_gpu(gpu, want):
    assert engine_filename(gpu, "10.3.0", "fp16", 1, 8, 64) == f"{want}_trt10.3.0_fp16_b1-8-64.plan"


def test_engine_filename_example_and_static_batch():
    assert (
        engine_filename("NVIDIA H100 80GB HBM3", "10.3.0", "fp16", 1, 8, 64)
        == "nvidia-h100-80gb-hbm3_trt10.3.0_fp16_b1-8-64.plan"
    )
    assert engine_filename("NVIDIA L4", "10.0.1.6", "FP32", 4, 4, 4) == "nvidia-l4_trt10.0.1.6_fp32_b4-4-4.plan"


@pytest.mark.parametrize("batches", [(0, 1, 1), (2, 1, 4), (1, 5, 4), (1.0, 1, 2)])
def test_engine_filename_rejects_bad_batches(batches):
    with pytest.raises(ValueError, match="batch"):
        engine_filename("gpu", "10.3.0", "fp32", *batches)


# ---- build_engine: argument checks come before TensorRT is needed ------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"min_batch": 0}, "min_batch"),
        ({"min_batch": 4, "opt_batch": 2}, "min_batch"),
        ({"opt_batch": 32, "max_batch": 16}, "opt_batch"),
        ({"static_batch": 0}, "min_batch"),
        ({"static_batch": 4, "max_batch": 8}, "static_batch"),
        ({"fp16": True, "bf16": True}, "fp16"),
        ({"workspace_gib": 0}, "workspace"),
    ],
)
def test_build_engine_validates_arguments_first(no_tensorrt, tmp_path, kwargs, match):
    onnx_path = tmp_path / "unet.onnx"
    onnx_path.write_bytes(b"not parsed before the checks")
    with pytest.raises(ValueError, match=match):
        build_engine(onnx_path, tmp_path / "engines", **kwargs)


def test_build_engine_missing_file_and_missing_tensorrt(no_tensorrt, tmp_path):
    with pytest.raises(FileNotFoundError):
        build_engine(tmp_path / "absent.onnx", tmp_path)
    onnx_path = tmp_path / "unet.onnx"
    onnx_path.write_bytes(b"")
    for kwargs in ({}, {"static_batch": 4}, {"static_batch": 2, "min_batch": 2, "opt_batch": 2, "max_batch": 2}):
        with pytest.raises(TensorRTUnavailableError, match="pip install tensorrt"):
            build_engine(onnx_path, tmp_path, **kwargs)
    assert not list(tmp_path.glob("*.plan"))


def test_require_tensorrt_without_tensorrt(no_tensorrt):
    with pytest.raises(TensorRTUnavailableError, match="TensorRT is not installed.*ONNX bundle works without it"):
        require_tensorrt()


def test_runner_without_tensorrt(no_tensorrt, tmp_path):
    with pytest.raises(BackendUnavailableError, match="tensorrt cuda-python"):
        TensorRTRunner(tmp_path / "x.plan")


def test_runner_without_cuda_python(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    monkeypatch.setitem(sys.modules, "cuda", None)
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)
    with pytest.raises(BackendUnavailableError, match="needs cuda-python"):
        TensorRTRunner(tmp_path / "x.plan")


@pytest.mark.parametrize(
    "module, absent",
    [
        ("deploy_diff.runtime.backends.tensorrt", ["tensorrt", "torch"]),  # the runtime never needs torch
        ("deploy_diff.export.tensorrt", ["tensorrt"]),  # export needs torch, but TensorRT stays optional
    ],
)
def test_modules_import_without_tensorrt(module, absent):
    code = (
        f"import sys\nfor m in {absent!r}: sys.modules[m] = None\n"
        f"import {module}\n"
        "loaded = {k for k, v in sys.modules.items() if v is not None}\n"
        "print(sorted({'tensorrt', 'torch', 'cuda', 'onnxruntime'} & loaded))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert not {"tensorrt", "cuda"} & set(ast.literal_eval(out.stdout.strip())), out.stdout
    if "torch" in absent:
        assert out.stdout.strip() == "[]", out.stdout


# ---- build_engine's TensorRT calls, against a fake TensorRT -------------------------------------------------------


@pytest.fixture
def fake_build(monkeypatch, tmp_path):
    import deploy_diff.export.tensorrt as export_trt

    monkeypatch.setattr(export_trt, "gpu_name", lambda device_id=0: "NVIDIA Fake GPU 80GB")
    onnx_path = tmp_path / "unet.onnx"
    onnx_path.write_bytes(b"onnx")

    def make(inputs, parse_ok=True, build_ok=True):
        trt, seen = fake_builder(inputs, parse_ok, build_ok)
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        return onnx_path, seen

    return make


def test_build_engine_profile_flags_and_cache(fake_build, tmp_path):
    onnx_path, seen = fake_build({"sample": (-1, 3, 8, 8), "timestep": (-1,)})
    cache = tmp_path / "caches" / "t.cache"
    plan = build_engine(
        onnx_path,
        tmp_path / "engines",
        min_batch=1,
        opt_batch=4,
        max_batch=8,
        fp16=True,
        timing_cache=cache,
        workspace_gib=0.5,
        validate=False,
        log=lambda m: None,
    )
    assert plan == tmp_path / "engines" / "nvidia-fake-gpu-80gb_trt10.3.0_fp16_b1-4-8.plan"
    assert plan.read_bytes() == b"engine" and cache.read_bytes() == b"cache:" and seen["cache_in"] == b""
    assert seen["parsed"] == str(onnx_path) and seen["flags"] == ["fp16"]
    assert seen["workspace"] == ("workspace", 1 << 29)
    assert seen["profiles"] == [{"sample": ((1, 3, 8, 8), (4, 3, 8, 8), (8, 3, 8, 8)), "timestep": ((1,), (4,), (8,))}]
    onnx_path, seen = fake_build({"sample": (-1, 3, 8, 8), "timestep": (-1,)})  # the cache is read back
    plan = build_engine(
        onnx_path,
        tmp_path / "engines",
        static_batch=2,
        bf16=True,
        timing_cache=cache,
        validate=False,
        log=lambda m: None,
    )
    assert plan.name == "nvidia-fake-gpu-80gb_trt10.3.0_bf16_b2-2-2.plan"
    assert seen["cache_in"] == b"cache:" and seen["flags"] == ["bf16"]
    assert seen["profiles"] == [{"sample": ((2, 3, 8, 8),) * 3, "timestep": ((2,),) * 3}]
    build_engine(onnx_path, tmp_path / "default", validate=False, log=lambda m: None)
    assert (tmp_path / "default" / "timing.cache").is_file()


def test_build_engine_errors(fake_build, tmp_path):
    onnx_path, _ = fake_build({"sample": (-1, 3, 8, 8)}, parse_ok=False)
    with pytest.raises(ValueError, match="could not parse(.|\n)*node 1: unsupported op"):
        build_engine(onnx_path, tmp_path, validate=False, log=lambda m: None)
    onnx_path, _ = fake_build({"sample": (-1, 3, -1, -1)})
    with pytest.raises(ValueError, match="only the batch dimension may be dynamic"):
        build_engine(onnx_path, tmp_path, validate=False, log=lambda m: None)
    onnx_path, _ = fake_build({"sample": (4, 3, 8, 8)})
    with pytest.raises(ValueError, match="static_batch=4"):
        build_engine(onnx_path, tmp_path, validate=False, log=lambda m: None)
    onnx_path, seen = fake_build({"sample": (4, 3, 8, 8)})
    plan = build_engine(onnx_path, tmp_path, static_batch=4, validate=False, log=lambda m: None)
    assert plan.name.endswith("_fp32_b4-4-4.plan")
    assert seen["profiles"] == []  # nothing dynamic, no profile
    onnx_path, _ = fake_build({"sample": (-1, 3, 8, 8)}, build_ok=False)
    with pytest.raises(RuntimeError, match="failed to build"):
        build_engine(onnx_path, tmp_path / "none", validate=False, log=lambda m: None)
    assert not list((tmp_path / "none").glob("*.plan"))


# ---- the runner's batching, against a fake TensorRT and cuda-python ----------------------------------------------


@pytest.fixture(params=["cuda.bindings.runtime", "cuda.cudart", "cuda-python 13"])
def fake_runner(monkeypatch, tmp_path, request):
    def make(lo, hi, out_dtype=np.float32):
        trt, cuda, memory, calls = fake_backend(lo, hi, out_dtype, native_handles=request.param == "cuda-python 13")
        install_fake_cuda(monkeypatch, trt, cuda, request.param)
        path = tmp_path / "fake.plan"
        path.write_bytes(b"plan")
        return TensorRTRunner(path), memory, calls

    return make


@pytest.mark.parametrize(
    "lo, hi, batches, want_calls",
    [
        (1, 4, [1, 3, 4, 5, 9], [1, 3, 4, 4, 1, 4, 4, 1]),
        (2, 2, [1, 2, 3], [2, 2, 2, 2]),  # static batch: pad 1 -> 2, split 3 -> 2 + (1 -> 2)
        (3, 8, [1, 10], [3, 8, 3]),
    ],
)
def test_runner_splits_pads_and_crops(fake_runner, lo, hi, batches, want_calls):
    runner, memory, calls = fake_runner(lo, hi)
    assert (runner.min_batch, runner.max_batch) == (lo, hi)
    assert runner.static_batch == (lo if lo == hi else None)
    assert runner.input_names == ["sample", "timestep"] and runner.output_name == "out"
    rng = np.random.default_rng(0)
    for b in batches:
        x = rng.standard_normal((b, 1, 4, 4)).astype(np.float32)
        t = rng.uniform(0, 999, b).astype(np.float32)
        out = runner(x, t)
        assert out.dtype == np.float32 and out.shape == x.shape
        np.testing.assert_allclose(out, 2 * x + t[:, None, None, None], rtol=1e-6)
    assert calls == want_calls
    assert len(memory) == 3
    runner.close()
    assert not memory
    runner.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        runner(np.zeros((1, 1, 4, 4), np.float32), np.zeros(1, np.float32))


def test_runner_casts_and_checks_inputs(fake_runner):
    runner, _, _ = fake_runner(1, 4, out_dtype=np.float16)
    x = np.ones((2, 1, 4, 4))  # float64 and an int timestep cast on the host; float16 output comes back float32
    out = runner(x, np.array([3, 5]))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[:, 0, 0, 0], [5, 7])
    np.testing.assert_allclose(runner(x, np.float32(1.0)), 3.0)  # one timestep for every row
    with pytest.raises(ValueError, match="sample must be"):
        runner(np.ones((2, 4, 4), np.float32), np.ones(2, np.float32))
    with pytest.raises(ValueError, match=r"sample must have shape \(2, 1, 4, 4\)"):
        runner(np.ones((2, 3, 4, 4), np.float32), np.ones(2, np.float32))
    with pytest.raises(ValueError, match="timestep must have shape"):
        runner(x, np.ones(3, np.float32))
    with pytest.raises(ValueError, match="does not cast"):
        runner(x.astype(np.complex64), np.ones(2, np.float32))
    with pytest.raises(ValueError, match="unexpected.*class_labels"):
        runner(x, np.ones(2, np.float32), np.zeros(2, np.int64))


# ---- real TensorRT on a GPU ----------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize(
    "kwargs, lo, hi", [({"min_batch": 1, "opt_batch": 2, "max_batch": 4}, 1, 4), ({"static_batch": 2}, 2, 2)]
)
def test_tensorrt_build_and_run(tmp_path, kwargs, lo, hi):
    pytest.importorskip("tensorrt")
    pytest.importorskip("onnx")
    onnx_path = tiny_onnx(tmp_path / "tiny.onnx")
    plan = build_engine(onnx_path, tmp_path / "engines", log=lambda msg: None, **kwargs)
    assert plan.is_file() and plan.name.endswith(f"_fp32_b{lo}-{lo if lo == hi else 2}-{hi}.plan")
    assert (tmp_path / "engines" / "timing.cache").is_file()
    runner = TensorRTRunner(plan)
    try:
        assert (runner.min_batch, runner.max_batch) == (lo, hi)
        rng = np.random.default_rng(0)
        for b in (1, 3, hi + 1):
            x = rng.standard_normal((b, 1, 4, 4)).astype(np.float32)
            t = rng.uniform(0, 999, b).astype(np.float32)
            np.testing.assert_allclose(runner(x, t), 2 * x + t[:, None, None, None], rtol=1e-6, atol=1e-5)
    finally:
        runner.close()
