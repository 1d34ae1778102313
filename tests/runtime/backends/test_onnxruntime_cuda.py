"""The CUDA side of ``load_session`` against an onnxruntime whose CUDA provider is faked (no GPU here): no silent
CPU fallback, a CUDA-graph capture failure named as such, provider options, and preloading CUDA libraries that
sit outside onnxruntime's own site-packages."""

import sys
import types

import pytest

ort = pytest.importorskip("onnxruntime")

from deploy_diff.runtime.backends import onnxruntime as ort_backend  # noqa: E402
from deploy_diff.runtime.backends.onnxruntime import load_session, preload_cuda_libraries  # noqa: E402

GRAPH_FAILURE = (
    "[ONNXRuntimeError] : 1 : FAIL : This session cannot use the CUDA Graph feature as requested by "
    "the user as all compute graph nodes have not been partitioned to the CUDA EP."
)


@pytest.fixture
def fake_cuda_ort(monkeypatch, tmp_path):
    """onnxruntime with its real options classes, a CUDA provider listed as available, and an InferenceSession
    that records its arguments and behaves as ``behaviour`` says: "ok", "cpu" (runs on the CPU provider only),
    "graph" (fails as ONNX Runtime does for a CUDA graph it cannot capture), "library" (a CUDA library error)."""
    calls, preloads = [], []
    state = {"behaviour": "ok"}
    site = tmp_path / "site-packages"
    (site / "onnxruntime").mkdir(parents=True)

    class Session:
        def __init__(self, path, options, providers=None, **kwargs):
            calls.append({"path": path, "providers": providers, **kwargs})
            if state["behaviour"] == "graph":
                raise RuntimeError(GRAPH_FAILURE)
            if state["behaviour"] == "library":
                raise RuntimeError("libcublasLt.so.12: cannot open shared object file (CUDA provider)")

        def get_providers(self):
            return (
                ["CPUExecutionProvider"]
                if state["behaviour"] == "cpu"
                else ["CUDAExecutionProvider", "CPUExecutionProvider"]
            )

    fake = types.SimpleNamespace(
        __file__=str(site / "onnxruntime" / "__init__.py"),
        SessionOptions=ort.SessionOptions,
        GraphOptimizationLevel=ort.GraphOptimizationLevel,
        InferenceSession=Session,
        get_available_providers=lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"],
        preload_dlls=lambda **kw: preloads.append(kw),
    )
    monkeypatch.setitem(sys.modules, "onnxruntime", fake)
    monkeypatch.setitem(sys.modules, "nvidia", None)  # no CUDA wheels unless a test installs some
    monkeypatch.setattr(ort_backend, "_preloaded", set())
    graph = tmp_path / "unet.onnx"
    graph.write_bytes(b"not read by the fake session")
    return types.SimpleNamespace(graph=graph, calls=calls, preloads=preloads, state=state, site=site)


def test_cuda_sessions_never_fall_back_to_the_cpu(fake_cuda_ort):
    load_session(fake_cuda_ort.graph, device="cuda:1", cuda_graph=True)
    call = fake_cuda_ort.calls[-1]
    assert call["enable_fallback"] == 0
    assert call["providers"] == [
        ("CUDAExecutionProvider", {"device_id": "1", "enable_cuda_graph": "1"}),
        "CPUExecutionProvider",
    ]
    fake_cuda_ort.state["behaviour"] = "cpu"  # a session that came up on the CPU anyway is refused
    with pytest.raises(
        RuntimeError,
        match=r"could not start the CUDA provider \(the session runs on "
        r"\['CPUExecutionProvider'\]\)",
    ):
        load_session(fake_cuda_ort.graph, device="cuda")


def test_a_cuda_graph_that_cannot_be_captured_names_itself(fake_cuda_ort):
    fake_cuda_ort.state["behaviour"] = "graph"
    with pytest.raises(ValueError, match="cannot capture a CUDA graph.*not been partitioned.*static_batch=B"):
        load_session(fake_cuda_ort.graph, device="cuda", cuda_graph=True)
    fake_cuda_ort.state["behaviour"] = "library"
    with pytest.raises(RuntimeError, match="could not start the CUDA provider.*libcublasLt"):
        load_session(fake_cuda_ort.graph, device="cuda")


def test_explicit_providers_keep_their_options(fake_cuda_ort):
    providers = [("CUDAExecutionProvider", {"device_id": "2", "use_tf32": "0"}), "CPUExecutionProvider"]
    load_session(fake_cuda_ort.graph, device="cpu", providers=providers, cuda_graph=True)
    assert fake_cuda_ort.calls[-1]["providers"][0] == (
        "CUDAExecutionProvider",
        {"device_id": "2", "use_tf32": "0", "enable_cuda_graph": "1"},
    )
    assert providers[0][1] == {"device_id": "2", "use_tf32": "0"}  # the caller's list is not changed
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda'"):
        load_session(fake_cuda_ort.graph, device="gpu", providers=providers)


def test_cpu_sessions_keep_onnxruntime_defaults(fake_cuda_ort):
    load_session(fake_cuda_ort.graph)
    assert fake_cuda_ort.calls[-1]["providers"] == ["CPUExecutionProvider"]
    assert fake_cuda_ort.preloads == []  # CUDA libraries are only looked for by CUDA sessions


def test_cuda_libraries_in_another_site_packages_are_preloaded_from_there(fake_cuda_ort, monkeypatch, tmp_path):
    other = tmp_path / "target" / "nvidia"  # pip install --target target nvidia-...
    own = fake_cuda_ort.site / "nvidia"  # onnxruntime.preload_dlls() finds these itself
    for root, names in ((other, ("cudnn", "cublas", "cuda_runtime")), (own, ("cufft",))):
        for name in names:
            (root / name / "lib").mkdir(parents=True)
    (other / "cublas" / "include").mkdir()
    monkeypatch.setitem(sys.modules, "nvidia", types.SimpleNamespace(__path__=[str(other), str(own)]))
    load_session(fake_cuda_ort.graph, device="cuda")
    want = [str(other / name / "lib") for name in ("cuda_runtime", "cublas", "cudnn")]  # dependencies first
    assert fake_cuda_ort.preloads == [{"directory": d} for d in want]
    load_session(fake_cuda_ort.graph, device="cuda")  # once per process
    assert len(fake_cuda_ort.preloads) == 3
    preload_cuda_libraries([own / "cufft" / "lib"])  # an explicit folder
    assert fake_cuda_ort.preloads[-1] == {"directory": str(own / "cufft" / "lib")}
    with pytest.raises(FileNotFoundError, match="no CUDA library folder"):
        preload_cuda_libraries([tmp_path / "absent"])
