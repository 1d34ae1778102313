"""Security: no user file is ever unpickled (a scan of the package source, and pickled payloads in a
trainer_state.pt and in a diffusers ``.bin`` that must never run), and a bundle cannot make the runtime read outside
its folder (symlinks) or allocate what its manifest claims (channels and sizes out of range).

Each test's docstring says what was tried, what the user sees, and what is kept.
"""

import ast
import builtins
import hashlib
import json
import shutil
from pathlib import Path

import pytest
from _reliability import copy_bundle, edit_manifest, one_error_line

import deploy_diff
from deploy_diff.cli import main
from deploy_diff.runtime import Pipeline
from deploy_diff.runtime.bundle import BundleError, load_bundle

PACKAGE = Path(deploy_diff.__file__).resolve().parent


class Payload:
    """Unpickling this object opens (creates) ``marker`` for writing: a stand-in for arbitrary code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


UNPICKLING_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def _dotted(node) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def _keyword(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
    return None


def unpickling_problems(source: str, rel: str) -> tuple[list[str], int]:
    """Every way ``source`` could unpickle a file, as ``rel:line: what``; and its number of torch.load calls."""
    tree = ast.parse(source, filename=rel)
    problems, torch_loads = [], 0
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [(node.module or "").split(".")[0]]
            if node.module == "torch" and any(a.name == "load" for a in node.names):
                problems.append(f"{rel}:{node.lineno}: `from torch import load` hides torch.load from this scan")
        else:
            continue
        problems += [f"{rel}:{node.lineno}: imports {name}" for name in names if name in UNPICKLING_MODULES]
    for call in _calls(tree):
        func = _dotted(call.func)
        where = f"{rel}:{call.lineno}: {func}(...)"
        if func in ("eval", "exec") or func.split(".")[0] in UNPICKLING_MODULES:
            problems.append(where)
        elif func == "torch.load":
            torch_loads += 1
            wo = _keyword(call, "weights_only")
            if not (isinstance(wo, ast.Constant) and wo.value is True):
                problems.append(where + " without weights_only=True")
        elif func.split(".")[-1] == "load" and func.split(".")[0] in ("np", "numpy"):
            ap = _keyword(call, "allow_pickle")
            if ap is not None and not (isinstance(ap, ast.Constant) and ap.value is False):
                problems.append(where + " with allow_pickle not False")
    return problems, torch_loads


def test_the_unpickling_scan_catches_each_pattern():
    """The source scan below flags each forbidden pattern in a sample (so a clean scan means something)."""
    bad = (
        "import pickle\nfrom dill import loads\nimport numpy as np\nimport torch\npickle.load(f)\n"
        "np.load(p, allow_pickle=True)\ntorch.load(p)\ntorch.load(p, weights_only=False)\neval(s)\n"
        "from torch import load\n"
    )
    problems, torch_loads = unpickling_problems(bad, "sample.py")
    assert torch_loads == 2
    for line in range(1, 11):
        if line not in (3, 4):
            assert any(p.startswith(f"sample.py:{line}:") for p in problems), (line, problems)
    ok = (
        "import numpy as np\nimport torch\nnp.load(p)\nnp.load(p, allow_pickle=False)\n"
        "torch.load(p, weights_only=True)\n"
    )
    assert unpickling_problems(ok, "ok.py") == ([], 1)


def test_package_source_never_unpickles():
    """A scan of every deploy_diff/**/*.py finds no pickle-family import, no pickle.load(s), no eval/exec, no
    np.load(allow_pickle=True), and every torch.load passes weights_only=True, so no user file can run code."""
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20
    problems, torch_loads = [], 0
    for path in files:
        found, n = unpickling_problems(path.read_text(encoding="utf-8"), str(path.relative_to(PACKAGE.parent)))
        problems += found
        torch_loads += n
    assert not problems, "\n".join(problems)
    assert torch_loads >= 1  # the scan does see the trainer-state read


@pytest.fixture
def evil_run(cond_run_dir, tmp_path):
    """A copy of the conditional run whose trainer_state.pt carries a Payload, with config.json's sha256 updated so
    the checkpoint's integrity check passes and only the safe loader stands in the way."""
    import torch

    run = tmp_path / "run"
    shutil.copytree(cond_run_dir, run)
    marker = tmp_path / "PAYLOAD_RAN"
    state = torch.load(run / "trainer_state.pt", weights_only=True)
    state["optimizer"] = Payload(marker)
    torch.save(state, run / "trainer_state.pt")
    cfg = json.loads((run / "config.json").read_text())
    cfg["files"]["trainer_state.pt"] = hashlib.sha256((run / "trainer_state.pt").read_bytes()).hexdigest()
    (run / "config.json").write_text(json.dumps(cfg))
    # the payload is live: an unsafe load runs it (on a throwaway copy)
    torch.load(run / "trainer_state.pt", weights_only=False)
    assert marker.exists()
    marker.unlink()
    return run, marker


def test_a_malicious_trainer_state_is_refused_and_never_runs(evil_run, capsys):
    """A trainer_state.pt holding a pickled object whose __reduce__ creates a file is refused by read_trainer_state
    (CheckpointError) and by `deploy-diff train --resume` (exit 1), and the file is never created."""
    from deploy_diff.train.checkpoint import CheckpointError, find_checkpoint, read_trainer_state

    run, marker = evil_run
    ckpt = find_checkpoint(run)
    assert ckpt.path == run  # the tampered top level itself, not a fallback to checkpoints/step_N
    with pytest.raises(CheckpointError, match="trainer_state.pt holds objects other than tensors"):
        read_trainer_state(ckpt)
    assert not marker.exists()
    assert main(["train", "--out", str(run), "--resume", "--steps", "40", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("deploy-diff train: error: CheckpointError: ") and "trainer_state.pt" in err
    assert "Traceback" not in err
    assert not marker.exists()


def test_a_malicious_trainer_state_error_is_one_safe_line(evil_run, capsys):
    """`deploy-diff train --resume` on a tampered trainer_state.pt should print one line that names the file and the
    refused global, without suggesting weights_only=False."""
    run, _ = evil_run
    assert main(["train", "--out", str(run), "--resume", "--steps", "40", "--no-progress"]) == 1
    line = one_error_line(capsys.readouterr().err, "train")
    assert "weights_only` set to `False" not in line and "\x1b[" not in line


def test_a_malicious_diffusers_bin_is_refused_and_never_runs(diffusers_pipeline_dir, tmp_path, capsys):
    """`deploy-diff export --from-diffusers` on a UNet folder whose diffusion_pytorch_model.bin carries a pickled
    payload exits 1 with one line `cannot load the UNet` (diffusers reads .bin with weights_only=True); the payload
    never runs."""
    import torch

    unet = tmp_path / "unet"
    unet.mkdir()
    shutil.copy(diffusers_pipeline_dir / "unet" / "config.json", unet / "config.json")
    marker = tmp_path / "PAYLOAD_RAN"
    torch.save({"conv_in.weight": Payload(marker)}, unet / "diffusion_pytorch_model.bin")
    rc = main(["export", "--from-diffusers", str(unet), "--out", str(tmp_path / "bundle")])
    line = one_error_line(capsys.readouterr().err, "export")
    assert rc == 1 and "cannot load the UNet" in line
    assert not marker.exists() and not (tmp_path / "bundle").exists()


def test_a_manifest_entry_through_a_symlinked_directory_is_refused(cond_run_bundle, tmp_path, monkeypatch):
    """A manifest entry `linked/secret.bin` where `linked` is a symlink to a folder outside the bundle raises
    BundleError `resolves outside the bundle folder` and the outside file is never opened (not even hashed)."""
    import deploy_diff.runtime.bundle as bundle_mod

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.bin").write_bytes(b"secret")
    b = copy_bundle(cond_run_bundle, tmp_path / "b")
    (b / "linked").symlink_to(outside, target_is_directory=True)
    entry = {"sha256": hashlib.sha256(b"secret").hexdigest(), "bytes": 6}
    edit_manifest(b, lambda m: m["files"].update({"linked/secret.bin": entry}))
    hashed = []
    real = bundle_mod.sha256_file
    monkeypatch.setattr(bundle_mod, "sha256_file", lambda p, *a, **k: hashed.append(Path(p)) or real(p, *a, **k))
    with pytest.raises(BundleError, match="resolves outside the bundle folder"):
        load_bundle(b)
    with pytest.raises(BundleError, match="resolves outside the bundle folder"):
        Pipeline.from_bundle(b)
    assert hashed and not any(outside in p.resolve().parents for p in hashed)


def test_a_bundle_reached_through_a_symlink_still_loads(cond_run_bundle, tmp_path):
    """Confinement is relative to the bundle's real folder: a bundle opened through a symlinked path (e.g. a `current`
    link to the latest release) loads and samples normally."""
    (tmp_path / "current").symlink_to(cond_run_bundle, target_is_directory=True)
    pipe = Pipeline.from_bundle(tmp_path / "current", scheduler="ddim", num_threads=1)
    assert pipe(num_images=1, num_inference_steps=2, seed=0, class_labels=3).shape == (1, 8, 8, 1)


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("in_channels", 0, "out of range"),
        ("in_channels", -1, "out of range"),
        ("in_channels", 1025, "out of range"),
        ("in_channels", 10**12, "out of range"),
        ("out_channels", 0, "out of range"),
        ("out_channels", 2049, "out of range"),
        ("out_channels", 10**12, "out of range"),
        ("sample_size", [8, 0], "out of range"),
        ("sample_size", [8, 10**6], "out of range"),
        ("sample_size", -8, "out of range"),
        ("in_channels", "many", "malformed"),
        ("in_channels", None, "malformed"),
        ("out_channels", [1], "malformed"),
    ],
)
def test_manifest_channels_and_sizes_out_of_range_are_refused(cond_run_bundle, tmp_path, key, value, match):
    """A manifest claiming channels outside 1..1024 (out: 1..2048), a side outside 1..8192, or a non-integer size
    raises BundleError before any array or session is created (the huge 10^12-element input already has its test)."""
    b = copy_bundle(cond_run_bundle, tmp_path / "b")
    edit_manifest(b, lambda m: m["model"].update({key: value}))
    with pytest.raises(BundleError, match=match):
        Pipeline.from_bundle(b)
