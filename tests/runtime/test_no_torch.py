"""The runtime imports with torch (and diffusers) made unimportable."""

import pkgutil
import subprocess
import sys

import deploy_diff.runtime as runtime


def test_every_runtime_module_imports_without_torch():
    modules = sorted(m.name for m in pkgutil.walk_packages(runtime.__path__, prefix="deploy_diff.runtime."))
    assert "deploy_diff.runtime.schedulers.ddim" in modules and "deploy_diff.runtime.sampling" in modules
    code = (
        "import sys, importlib\n"
        "sys.modules['torch'] = None\n"
        "sys.modules['diffusers'] = None\n"
        f"mods = {modules!r}\n"
        "for m in mods:\n"
        "    importlib.import_module(m)  # the TensorRT backend imports tensorrt lazily, inside its class\n"
        "from deploy_diff.runtime.schedulers import DDIMScheduler\n"
        "s = DDIMScheduler(); s.set_timesteps(3)\n"
        "assert 'torch' not in [k for k, v in sys.modules.items() if v is not None]\n"
        "print('ok', len(mods))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok")


def test_importing_the_package_is_light():
    code = "import sys, deploy_diff; heavy = {'torch', 'onnx', 'onnxruntime', 'numpy'} & set(sys.modules); print(heavy)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "set()", out.stdout + out.stderr


def test_sampling_a_bundle_and_the_cli_never_import_torch(diffusers_bundle, tmp_path):
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"
        "sys.modules['diffusers'] = None\n"
        "from deploy_diff.runtime import Pipeline\n"
        f"pipe = Pipeline.from_bundle({str(diffusers_bundle)!r}, scheduler='euler_a')\n"
        "images = pipe(num_images=2, num_inference_steps=3, seed=0, output_type='uint8')\n"
        "assert images.shape == (2, 8, 8, 1)\n"
        "from deploy_diff.cli import main\n"
        f"assert main(['sample', {str(diffusers_bundle)!r}, '-n', '2', '--steps', '2', '--no-progress', "
        f"'--out', {str(tmp_path / 'g.png')!r}]) == 0\n"
        f"assert main(['inspect', {str(diffusers_bundle)!r}]) == 0\n"
        "assert not {'torch', 'diffusers', 'onnx'} & {k for k, v in sys.modules.items() if v is not None}\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok") and (tmp_path / "g.png").is_file()
