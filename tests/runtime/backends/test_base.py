"""The shared backend pieces: device strings, the one input check, chunking/padding, BackendUnavailableError, and
the ONNX Runtime runner's close/context-manager protocol and batching on real tiny ONNX graphs."""

import sys

import numpy as np
import pytest
from _trt_fakes import tiny_onnx

from deploy_diff.runtime import backends
from deploy_diff.runtime.backends import BackendUnavailableError, check_inputs, parse_device, run_in_batches
from deploy_diff.runtime.backends.base import import_backend_module

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


# ---- device strings ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "device, want",
    [
        ("cpu", ("cpu", 0)),
        ("cuda", ("cuda", 0)),
        ("cuda:0", ("cuda", 0)),
        ("cuda:3", ("cuda", 3)),
        ("cuda:12", ("cuda", 12)),
    ],
)
def test_parse_device(device, want):
    assert parse_device(device) == want


@pytest.mark.parametrize("device", ["tpu", "cpu:1", "cuda:", "cuda:-1", "cuda:x", "CUDA", " cuda", "cuda:1:2", 0, None])
def test_parse_device_refuses(device):
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda' \\(or 'cuda:N'\\)"):
        parse_device(device)


# ---- the shared input check -------------------------------------------------------------------------------------


def _check(sample, timestep, labels=None, conditional=False, shape=(1, 4, 4), dtypes=None):
    return check_inputs(sample, timestep, labels, sample_shape=shape, conditional=conditional, dtypes=dtypes)


def test_check_inputs_casts_and_repeats_a_scalar_timestep():
    out = _check(np.ones((3, 1, 4, 4), np.float64), 7, np.array([0, 1, 2], np.int32), conditional=True)
    assert list(out) == ["sample", "timestep", "class_labels"]
    assert out["sample"].dtype == np.float32 and out["sample"].flags.c_contiguous
    assert out["timestep"].dtype == np.float32 and out["timestep"].tolist() == [7.0, 7.0, 7.0]
    assert out["class_labels"].dtype == np.int64 and out["class_labels"].tolist() == [0, 1, 2]
    out = _check(
        np.ones((2, 1, 4, 4), np.float16),
        np.array([1, 2], np.uint8),
        shape=(None, None, None),
        dtypes={"sample": np.float16},
    )
    assert out["sample"].dtype == np.float16 and out["timestep"].dtype == np.float32
    assert "class_labels" not in out


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((np.ones((1, 4, 4)), 1), {}, r"sample must be a \[B, C, H, W\] array; got shape \(1, 4, 4\)"),
        ((np.ones((0, 1, 4, 4)), np.ones(0)), {}, "empty batch"),
        (
            (np.ones((2, 3, 4, 4)), 1),
            {},
            r"sample has shape \(2, 3, 4, 4\); this model takes \[B, 1, 4, 4\], so sample "
            r"must have shape \(2, 1, 4, 4\)",
        ),
        ((np.ones((2, 1, 4, 5)), 1), {"shape": (1, None, 4)}, r"takes \[B, 1, None, 4\].*\(2, 1, 4, 4\)"),
        ((np.ones((2, 1, 4, 4), np.int64), 1), {}, "int64, which does not cast to float32: sample must be a float"),
        ((np.ones((2, 1, 4, 4), np.complex64), 1), {}, "does not cast"),
        ((np.ones((2, 1, 4, 4)), np.ones(3)), {}, r"timestep must have shape \[2\] \(one per image\) or be a scalar"),
        ((np.ones((2, 1, 4, 4)), np.ones((2, 1))), {}, r"timestep must have shape \[2\]"),
        ((np.ones((2, 1, 4, 4)), np.array(["a", "b"])), {}, "timestep must be numeric"),
        ((np.ones((2, 1, 4, 4)), 1), {"conditional": True}, "class-conditional: pass class_labels int64"),
        ((np.ones((2, 1, 4, 4)), 1, np.zeros(2)), {"conditional": True}, "integer array of shape \\[2\\]; got float64"),
        ((np.ones((2, 1, 4, 4)), 1, np.zeros(3, np.int64)), {"conditional": True}, "integer array"),
        ((np.ones((2, 1, 4, 4)), 1, np.zeros(2, np.int64)), {}, "unconditional: class_labels must be None.*unexpected"),
    ],
)
def test_check_inputs_refuses(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _check(*args, **kwargs)


# ---- chunking and padding ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "batch, lo, hi, want",
    [
        (5, 1, None, [5]),  # dynamic batch: one call
        (5, 2, 2, [2, 2, 2]),  # static batch 2: 2 + 2 + (1 padded to 2)
        (1, 4, 4, [4]),
        (9, 3, 4, [4, 4, 3]),  # a TensorRT profile 3..4: the last row alone is padded to 3
        (4, 4, 4, [4]),
    ],
)
def test_run_in_batches_chunks_and_pads(batch, lo, hi, want):
    seen = []

    def run(chunk):
        seen.append({k: v.copy() for k, v in chunk.items()})
        return (chunk["sample"] * 2).astype(np.float16)

    x = np.arange(batch, dtype=np.float32)[:, None] * np.ones((batch, 3), np.float32)
    labels = np.arange(batch, dtype=np.int64)
    out = run_in_batches(run, {"sample": x, "class_labels": labels}, min_batch=lo, max_batch=hi)
    assert out.dtype == np.float32 and out.shape == x.shape
    np.testing.assert_array_equal(out, 2 * x)
    assert [len(c["sample"]) for c in seen] == want
    last = seen[-1]
    n_real = batch - sum(want[:-1]) if len(want) > 1 else batch
    assert (last["class_labels"][n_real:] == labels[-1]).all()  # padding repeats the last real row
    assert (last["sample"][n_real:] == x[-1]).all()


# ---- BackendUnavailableError ------------------------------------------------------------------------------------


def test_backend_unavailable_error_is_one_import_error_with_its_old_names(monkeypatch):
    from deploy_diff.export.tensorrt import TensorRTUnavailableError
    from deploy_diff.runtime.backends import tensorrt as trt_backend

    assert issubclass(BackendUnavailableError, ImportError)
    assert TensorRTUnavailableError is BackendUnavailableError is trt_backend.BackendUnavailableError
    assert backends.base.BackendUnavailableError is BackendUnavailableError
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match="needs onnxruntime: pip install"):  # `except ImportError` still works
        import_backend_module("onnxruntime", "the ONNX Runtime backend needs onnxruntime: pip install it")
    from deploy_diff.runtime.backends.onnxruntime import OnnxRuntimeRunner

    with pytest.raises(BackendUnavailableError, match=r"deploy-diff\[cpu\]"):
        OnnxRuntimeRunner("unet.onnx")


def test_the_backends_package_imports_nothing_heavy():
    import subprocess

    code = (
        "import sys\nimport deploy_diff.runtime.backends, deploy_diff.runtime.backends.onnxruntime, "
        "deploy_diff.runtime.backends.tensorrt\n"
        "print(sorted({'onnxruntime', 'tensorrt', 'cuda', 'torch'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ---- the ONNX Runtime runner on real graphs ---------------------------------------------------------------------


def test_ort_runner_runs_closes_and_is_a_context_manager(tmp_path):
    from deploy_diff.runtime.backends.onnxruntime import OnnxRuntimeRunner

    graph = tiny_onnx(tmp_path / "tiny.onnx")
    x = np.random.default_rng(0).standard_normal((3, 1, 4, 4)).astype(np.float32)
    with OnnxRuntimeRunner(graph) as runner:
        assert runner.input_names == ("sample", "timestep") and runner.static_batch is None  # a tuple, as it always was
        assert runner.sample_shape == (1, 4, 4) and not runner.conditional
        np.testing.assert_allclose(runner(x, np.array([0, 1, 2])), 2 * x + np.arange(3)[:, None, None, None])
    with pytest.raises(RuntimeError, match="this OnnxRuntimeRunner was closed"):
        runner(x, 0)
    assert runner.session is None
    runner.close()  # idempotent
    runner = OnnxRuntimeRunner(graph, num_threads=1)
    runner.close()
    with pytest.raises(RuntimeError, match="closed"):
        runner(x, 0)


def test_ort_runner_pads_a_static_batch_graph_and_checks_labels(tmp_path):
    from deploy_diff.runtime.backends.onnxruntime import OnnxRuntimeRunner

    graph = tiny_onnx(tmp_path / "static.onnx", batch=2, conditional=True)
    rng = np.random.default_rng(1)
    with OnnxRuntimeRunner(graph) as runner:
        assert runner.static_batch == 2 and runner.conditional
        for b in (1, 2, 3, 5):
            x = rng.standard_normal((b, 1, 4, 4)).astype(np.float32)
            labels = np.arange(b)
            out = runner(x, 10.0, labels)
            assert out.shape == x.shape and out.dtype == np.float32
            np.testing.assert_allclose(out, 2 * x + 10 + labels[:, None, None, None], rtol=1e-6)
        with pytest.raises(ValueError, match="class-conditional: pass class_labels"):
            runner(x, 1.0)
        with pytest.raises(ValueError, match="sample has shape"):
            runner(np.zeros((2, 1, 8, 8), np.float32), 1.0, np.zeros(2, np.int64))


@pytest.mark.parametrize("names", [["sample"], ["timestep", "class_labels"], ["sample", "timestep", "mask"]])
def test_graph_inputs_must_be_a_unets(names):
    from deploy_diff.runtime.backends.base import check_graph_inputs

    check_graph_inputs(["sample", "timestep"], "unet.onnx")
    check_graph_inputs(["class_labels", "sample", "timestep"], "unet.onnx")
    with pytest.raises(ValueError, match=r"x.onnx has inputs .*a UNet graph takes `sample` and `timestep`"):
        check_graph_inputs(names, "x.onnx")
