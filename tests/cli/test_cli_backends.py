"""``deploy-diff sample`` on every CPU backend and precision: the images, the line it prints, and refusals."""

import subprocess
import sys

import numpy as np
import pytest

from deploy_diff.cli import main
from deploy_diff.runtime import Pipeline

pytest.importorskip("openvino")
from deploy_diff.runtime.backends.openvino import bf16_supported  # noqa: E402


def _npz(path):
    with np.load(path) as f:
        return f["images"]


@pytest.mark.parametrize("backend", ["openvino", "auto"])
def test_sample_on_openvino_equals_onnxruntime(diffusers_bundle, tmp_path, capsys, backend):
    args = ["sample", str(diffusers_bundle), "--scheduler", "ddim", "--steps", "5", "-n", "2", "--seed", "0"]
    assert main([*args, "--no-progress", "--npz", "--out", str(tmp_path / "ort.npz")]) == 0
    assert "OnnxRuntime fp32" in capsys.readouterr().out
    cache = tmp_path / "cache"
    out = tmp_path / "ov.npz"
    assert (
        main([*args, "--backend", backend, "--cache-dir", str(cache), "--no-progress", "--npz", "--out", str(out)]) == 0
    )
    assert "OpenVINO fp32" in capsys.readouterr().out
    assert any(cache.iterdir())
    np.testing.assert_allclose(_npz(out), _npz(tmp_path / "ort.npz"), atol=1e-5)


@pytest.mark.skipif(not bf16_supported(), reason="this CPU has no bf16 arithmetic")
def test_sample_in_bf16_writes_a_grid(cond_run_bundle, tmp_path, capsys):
    out = tmp_path / "bf16.png"
    args = ["sample", str(cond_run_bundle), "--backend", "openvino", "--precision", "bf16", "--class", "3"]
    assert main([*args, "--steps", "4", "-n", "3", "--seed", "1", "--no-progress", "--out", str(out)]) == 0
    assert "OpenVINO bf16" in capsys.readouterr().out and out.stat().st_size > 0


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--backend", "openvino", "--precision", "fp16"], "openvino backend supports precision ['fp32', 'bf16']"),
        (["--precision", "bf16"], "onnxruntime backend supports precision ['fp32', 'fp16']; got 'bf16'"),
        (["--precision", "int8"], "precision must be one of ['fp32', 'fp16', 'bf16']"),
        (["--backend", "openvino", "--device", "cuda"], "supports device 'cpu' only"),
        (["--backend", "coreml"], "backend must be one of ['onnxruntime', 'openvino', 'tensorrt', 'auto']"),
    ],
)
def test_unsupported_combinations_are_one_line_errors(diffusers_bundle, tmp_path, capsys, flags, words):
    assert main(["sample", str(diffusers_bundle), *flags, "--out", str(tmp_path / "g.png")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0]
    assert not (tmp_path / "g.png").exists()


def test_openvino_sampling_never_imports_torch(diffusers_bundle, tmp_path):
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"
        "sys.modules['diffusers'] = None\n"
        "from deploy_diff.cli import main\n"
        f"assert main(['sample', {str(diffusers_bundle)!r}, '--backend', 'openvino', '-n', '2', '--steps', '2', "
        f"'--no-progress', '--out', {str(tmp_path / 'g.png')!r}]) == 0\n"
        "assert not {'torch', 'diffusers', 'onnx'} & {k for k, v in sys.modules.items() if v is not None}\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok") and (tmp_path / "g.png").is_file()


def test_the_pipeline_repr_names_backend_and_precision(diffusers_bundle):
    pipe = Pipeline.from_bundle(diffusers_bundle, backend="openvino", scheduler="ddim")
    assert repr(pipe).startswith("Pipeline(OpenVINORunner from") and "precision=fp32" in repr(pipe)
