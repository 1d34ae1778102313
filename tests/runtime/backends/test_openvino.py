"""The OpenVINO backend: images equal to diffusers' for the same seed at fp32, bf16 computed in bf16, one compiled
model per batch shape (least recently used dropped), threads, the model cache, and clear errors."""

import sys

import numpy as np
import pytest
from _bundles import IMAGE_TOL, call_in_threads, diffusers_images

from deploy_diff.runtime import Pipeline
from deploy_diff.runtime.backends import BackendUnavailableError

ov = pytest.importorskip("openvino")
from deploy_diff.runtime.backends.openvino import OpenVINORunner, bf16_supported, openvino_available  # noqa: E402

needs_bf16 = pytest.mark.skipif(not bf16_supported(), reason="this CPU has no bf16 arithmetic (AVX512-BF16 or AMX)")


def _inputs(batch, labels=False, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, 1, 8, 8)).astype(np.float32)
    t = rng.integers(0, 1000, batch).astype(np.float32)
    return (x, t, rng.integers(0, 10, batch)) if labels else (x, t)


@pytest.fixture(scope="module")
def ort_runner(diffusers_bundle):
    from deploy_diff.runtime.backends.onnxruntime import OnnxRuntimeRunner

    with OnnxRuntimeRunner(diffusers_bundle / "unet.onnx") as runner:
        yield runner


@pytest.mark.parametrize("kind, eta, seed", [("ddim", 0.0, 0), ("ddim", 1.0, 3), ("ddpm", 0.0, 5)])
def test_fp32_equals_diffusers_pipelines_for_the_same_seed(diffusers_pipeline_dir, diffusers_bundle, kind, eta, seed):
    pipe = Pipeline.from_bundle(diffusers_bundle, backend="openvino", scheduler=kind)
    assert pipe.precision == "fp32" and pipe.runner.precision == "fp32"
    ours = pipe(num_images=3, num_inference_steps=50, seed=seed, eta=eta)
    ref = diffusers_images(diffusers_pipeline_dir, kind, seed, eta=eta)
    assert ours.shape == ref.shape and ours.dtype == np.float32
    assert np.abs(ours - ref).max() <= IMAGE_TOL


@pytest.mark.parametrize(
    "scheduler, kw",
    [
        ("dpmsolver++", dict(guidance_scale=3.0, class_labels=[1, 5, 9])),
        ("euler_a", dict(class_labels=7)),
        ("unipc", dict(guidance_scale=2.0, class_labels=[0, 0, 3])),
    ],
)
def test_fp32_equals_onnxruntime_on_a_conditional_model(cond_run_bundle, scheduler, kw):
    ours = Pipeline.from_bundle(cond_run_bundle, backend="openvino", scheduler=scheduler, num_threads=1)
    ref = Pipeline.from_bundle(cond_run_bundle, scheduler=scheduler)
    a = ours(num_images=3, num_inference_steps=20, seed=2, **kw)
    b = ref(num_images=3, num_inference_steps=20, seed=2, **kw)
    assert np.abs(a - b).max() <= IMAGE_TOL


def test_one_forward_in_fp32_equals_onnxruntime(diffusers_bundle, ort_runner):
    with OpenVINORunner(diffusers_bundle / "unet.onnx", num_threads=1) as runner:
        assert runner.precision == "fp32" and runner.num_threads == 1
        for batch in (1, 3):
            x, t = _inputs(batch)
            ref = ort_runner(x, t)
            out = runner(x, t)
            assert out.dtype == np.float32 and out.shape == ref.shape
            assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max()


@needs_bf16
def test_bf16_computes_in_bf16(diffusers_bundle, ort_runner):
    with OpenVINORunner(diffusers_bundle / "unet.onnx", precision="bf16") as runner:
        assert runner.precision == "bf16"  # read back from the compiled model
        x, t = _inputs(4)
        ref = ort_runner(x, t)
        err = np.abs(runner(x, t) - ref).max() / np.abs(ref).max()
    # bf16 keeps 8 mantissa bits: a UNet forward moves by about 1e-2 relative, far above float32's 1e-7
    assert 1e-4 < err < 0.1


@needs_bf16
def test_bf16_pipeline_samples_close_to_fp32(cond_run_bundle):
    fp32 = Pipeline.from_bundle(cond_run_bundle, backend="openvino", scheduler="ddim")
    bf16 = Pipeline.from_bundle(cond_run_bundle, backend="openvino", scheduler="ddim", precision="bf16")
    assert bf16.precision == "bf16" and "precision=bf16" in repr(bf16)
    a = fp32(num_images=4, num_inference_steps=10, seed=0, class_labels=[1, 2, 3, 4])
    b = bf16(num_images=4, num_inference_steps=10, seed=0, class_labels=[1, 2, 3, 4])
    assert np.isfinite(b).all() and 0 < np.abs(a - b).mean() < 0.05


def test_one_compiled_model_per_batch_shape_least_recently_used_dropped(diffusers_bundle, ort_runner):
    with OpenVINORunner(diffusers_bundle / "unet.onnx", max_shapes=2) as runner:
        assert runner.compiled_shapes == [(1, 1, 8, 8)]  # compiled at load
        for batch in (2, 3, 2):
            x, t = _inputs(batch, seed=batch)
            np.testing.assert_allclose(runner(x, t), ort_runner(x, t), rtol=0, atol=1e-5)
        assert runner.compiled_shapes == [(3, 1, 8, 8), (2, 1, 8, 8)]
        runner(*_inputs(5))
        assert runner.compiled_shapes == [(2, 1, 8, 8), (5, 1, 8, 8)]


def test_threads_share_one_runner(cond_run_bundle):
    runner = OpenVINORunner(cond_run_bundle / "unet.onnx", num_threads=1)
    jobs = [_inputs(1 + i % 3, labels=True, seed=i) for i in range(12)]
    serial = [runner(*job) for job in jobs]
    results = call_in_threads(lambda job: runner(*job), jobs, repeats=3)
    for got, want in zip(results, serial):
        np.testing.assert_array_equal(got, want)
    runner.close()
    runner.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        runner(*jobs[0])


def test_static_batch_bundles_chunk_and_pad(cond_run_dir, cond_run_bundle, tmp_path):
    from deploy_diff.export import export_bundle, load_run_source

    static = tmp_path / "static"
    export_bundle(load_run_source(cond_run_dir), static, static_batch=2, log=None)
    pipe = Pipeline.from_bundle(static, backend="openvino", scheduler="ddim")
    assert pipe.runner.static_batch == 2 and pipe.runner.compiled_shapes == [(2, 1, 8, 8)]
    ref = Pipeline.from_bundle(cond_run_bundle, scheduler="ddim")
    for n in (3, 1):
        a = pipe(num_images=n, num_inference_steps=4, seed=1, class_labels=n)
        np.testing.assert_allclose(a, ref(num_images=n, num_inference_steps=4, seed=1, class_labels=n), atol=1e-5)
    assert pipe.runner.compiled_shapes == [(2, 1, 8, 8)]


def test_the_model_cache_is_written_and_reused(diffusers_bundle, tmp_path):
    cache = tmp_path / "ov-cache"
    first = Pipeline.from_bundle(diffusers_bundle, backend="openvino", scheduler="ddim", cache_dir=cache)
    a = first(num_images=2, num_inference_steps=5, seed=0)
    assert cache.is_dir() and any(cache.iterdir())  # one compiled blob per shape
    blobs = sorted(p.name for p in cache.iterdir())
    second = Pipeline.from_bundle(diffusers_bundle, backend="openvino", scheduler="ddim", cache_dir=cache)
    np.testing.assert_array_equal(second(num_images=2, num_inference_steps=5, seed=0), a)
    assert sorted(p.name for p in cache.iterdir()) == blobs  # loaded from the cache, nothing compiled anew
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        Pipeline.from_bundle(diffusers_bundle, backend="openvino", cache_dir=tmp_path / "a-file")


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(device="cuda"), "supports device 'cpu' only"),
        (dict(device="cuda:1"), "supports device 'cpu' only"),
        (dict(precision="fp16"), r"openvino backend supports precision \['fp32', 'bf16'\]; got 'fp16'"),
        (dict(precision="int8"), "precision must be one of"),
        (dict(num_threads=0), "num_threads must be a positive integer"),
        (dict(cuda_graph=True), "ONNX Runtime options"),
        (dict(providers=["CPUExecutionProvider"]), "ONNX Runtime options"),
    ],
)
def test_bad_arguments_are_refused(diffusers_bundle, kw, match):
    with pytest.raises(ValueError, match=match):
        Pipeline.from_bundle(diffusers_bundle, backend="openvino", **kw)


def test_runner_input_checks_and_bad_graphs(cond_run_bundle, tmp_path):
    with OpenVINORunner(cond_run_bundle / "unet.onnx") as runner:
        assert runner.conditional and runner.sample_shape == (1, 8, 8)
        x, t, labels = _inputs(2, labels=True)
        with pytest.raises(ValueError, match="class-conditional"):
            runner(x, t)
        with pytest.raises(ValueError, match="sample has shape"):
            runner(np.zeros((2, 1, 4, 4), np.float32), t, labels)
    with pytest.raises(ValueError, match="max_shapes"):
        OpenVINORunner(cond_run_bundle / "unet.onnx", max_shapes=0)
    with pytest.raises(FileNotFoundError, match="no ONNX graph"):
        OpenVINORunner(tmp_path / "missing.onnx")
    (tmp_path / "bad.onnx").write_bytes(b"not a graph")
    with pytest.raises(ValueError, match="OpenVINO cannot read"):
        OpenVINORunner(tmp_path / "bad.onnx")


def test_without_openvino_auto_falls_back_and_openvino_is_a_clear_error(diffusers_bundle, monkeypatch):
    auto = Pipeline.from_bundle(diffusers_bundle, backend="auto")
    assert type(auto.runner).__name__ == "OpenVINORunner" and auto.precision == "fp32"
    monkeypatch.setitem(sys.modules, "openvino", None)
    assert not openvino_available()
    assert type(Pipeline.from_bundle(diffusers_bundle, backend="auto").runner).__name__ == "OnnxRuntimeRunner"
    with pytest.raises(BackendUnavailableError, match=r"pip install 'deploy-diff\[openvino\]'"):
        Pipeline.from_bundle(diffusers_bundle, backend="openvino")
