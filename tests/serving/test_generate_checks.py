"""``deploy-diff generate`` refuses bad flags, bundles of another kind and unusable folders before Ray starts, in
one line naming the flag; its modules import neither Ray nor torch; a worker refuses a bundle that is not the
driver's. No Ray instance is started here."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from _generate_helpers import cli

from deploy_diff.serving.generate import MANIFEST, GenerateError, GenerateWorker, bundle_sha256


def _ray_started() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("deploy-diff generate: error: "), err[0]
    return err[0]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--num-images", "0"], "ValueError: --num-images must be a positive int; got 0"),
        (["--shard-size", "0"], "ValueError: --shard-size must be a positive int; got 0"),
        (["--workers", "0"], "ValueError: --workers must be a positive int; got 0"),
        (["--threads", "0"], "ValueError: --threads must be a positive int; got 0"),
        (["--seed-base", "-1"], "ValueError: --seed-base must be an int >= 0; got -1"),
        (
            ["--seed-base", str(2**63 - 5)],
            f"ValueError: --seed-base {2**63 - 5} with --num-images 10 gives seeds up to {2**63 + 4}; seeds are "
            "stored as int64, so the last one must be below 2**63",
        ),
        (["--steps", "0"], "ValueError: --steps 0 is outside [1, num_train_timesteps=1000]"),
        (["--scheduler", "nope"], "ValueError: unknown scheduler 'nope'; expected one of ["),
        (
            ["--guidance", "2"],
            "ValueError: --guidance needs a class-conditional model trained with label dropout; this model is "
            "unconditional, so pass no --guidance",
        ),
        (["--classes", "1,2"], "is unconditional: it takes no classes; got --classes [1, 2]"),
    ],
    ids=[
        "num-images",
        "shard-size",
        "workers",
        "threads",
        "seed-base",
        "seed-overflow",
        "steps",
        "scheduler",
        "guidance-unconditional",
        "classes-unconditional",
    ],
)
def test_bad_flags_are_refused_before_ray_naming_the_flag(diffusers_bundle, tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    assert cli([str(diffusers_bundle), "--num-images", "10", "--out", str(out), *flags]) == 1
    assert message in _one_error_line(capsys)
    assert not out.exists()  # nothing written
    assert not _ray_started()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--classes", "10,12"], "ValueError: --classes must lie in 0..9 (or 10, the null label); got [10, 12]"),
        (["--classes", ","], "ValueError: --classes must be 'balanced' or a non-empty list of class labels; got []"),
        (["--guidance", "-1"], "ValueError: --guidance must be a finite number >= 0 or None; got -1.0"),
    ],
    ids=["label-out-of-range", "no-labels", "negative-guidance"],
)
def test_class_rules_of_a_conditional_bundle(cond_run_bundle, tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    assert cli([str(cond_run_bundle), "--num-images", "10", "--out", str(out), *flags]) == 1
    assert message in _one_error_line(capsys)
    assert not out.exists() and not _ray_started()


def test_classes_that_are_not_labels_are_an_argument_error(diffusers_bundle, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli([str(diffusers_bundle), "--num-images", "10", "--out", str(tmp_path / "o"), "--classes", "sevens"])
    assert exit_info.value.code == 2
    assert "expected balanced or a comma list of labels like 0,3,7; got 'sevens'" in capsys.readouterr().err


def test_unusable_out_folders_and_bundles_are_refused(diffusers_bundle, sd_bundle, tmp_path, capsys):
    base = [str(diffusers_bundle), "--num-images", "10", "--out"]
    file = tmp_path / "file.npz"
    file.write_bytes(b"x")
    assert cli([*base, str(file)]) == 1
    assert f"GenerateError: --out {str(file)!r} is a file; give a folder" in _one_error_line(capsys)

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    assert cli([*base, str(busy)]) == 1
    assert f"GenerateError: {busy} is not empty and holds no {MANIFEST}" in _one_error_line(capsys)

    (busy / MANIFEST).write_text(json.dumps({"format": "something else"}))
    assert cli([*base, str(busy)]) == 1
    assert "is not a generate manifest (format 'deploy-diff/generated' expected)" in _one_error_line(capsys)
    assert sorted(p.name for p in busy.iterdir()) == [MANIFEST, "notes.txt"]

    out = tmp_path / "out"  # a bundle of another kind (a text-to-image bundle) is refused by kind
    assert cli([str(sd_bundle), *base[1:], str(out)]) == 1
    line = _one_error_line(capsys)
    assert "ValueError: bundle" in line and "holds a 'text-to-image'" in line and "pixel-space UNet bundles" in line
    assert cli([str(tmp_path / "nothing"), *base[1:], str(out)]) == 1
    assert "BundleError: no bundle at" in _one_error_line(capsys)
    assert not out.exists() and not _ray_started()


def test_a_worker_refuses_a_bundle_that_is_not_the_drivers(diffusers_bundle):
    """On a cluster every node reads the bundle at the driver's path; a node holding another one says so."""
    settings = {"scheduler": None, "num_threads": 1, "num_inference_steps": 2, "guidance_scale": None}
    settings.update(backend="onnxruntime", precision="fp32")
    with pytest.raises(GenerateError, match=r"is not the driver's \(sha256 000000000000\.\.\., found [0-9a-f]{12}\)"):
        GenerateWorker(str(diffusers_bundle), "0" * 64, settings)
    worker = GenerateWorker(str(diffusers_bundle), bundle_sha256(diffusers_bundle), settings)  # the right one runs
    images = worker.run([5, 6], None)
    assert images.dtype.name == "uint8" and images.shape == (2, 8, 8, 1)


def test_the_generate_modules_import_neither_ray_nor_torch():
    code = (
        "import sys; import deploy_diff.serving.generate, deploy_diff.cli.generate; "
        "print(sorted(m for m in ('ray', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
