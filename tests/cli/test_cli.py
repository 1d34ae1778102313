"""The command line: readable output, JSON, one-line errors, and no torch import for runtime commands."""

import json
import subprocess
import sys

import diffusers
import numpy as np
import pytest

from deploy_diff.cli import main


def test_schedules_json_lists_every_schedule(capsys):
    assert main(["schedules", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    names = [r["name"] for r in rows]
    assert "karras" in names and "scaled_linear" in names and "iddpm_linear" in names
    karras = next(r for r in rows if r["name"] == "karras")
    assert karras["alphas_cumprod_last"] == pytest.approx(1 / (1 + 80.0**2), rel=1e-9)


def test_timesteps_from_a_diffusers_config_file(tmp_path, capsys):
    diffusers.DDPMScheduler(timestep_spacing="trailing").save_config(tmp_path)
    assert main(["timesteps", str(tmp_path), "--steps", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    theirs = diffusers.DDPMScheduler(timestep_spacing="trailing")
    theirs.set_timesteps(4)
    assert out["scheduler"] == "DDPMScheduler"
    np.testing.assert_array_equal(out["timesteps"], theirs.timesteps.numpy())


def test_errors_are_one_line_and_non_zero(tmp_path, capsys):
    assert main(["timesteps", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no scheduler config" in err[0]
    assert main(["timesteps", "--scheduler", "ddim", "--steps", "0"]) == 1
    assert "num_inference_steps" in capsys.readouterr().err


def test_console_script_runs_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None; from deploy_diff.cli import main; "
        "sys.exit(main(['timesteps', '--scheduler', 'ddim', '--steps', '3']))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "666 333 0" in out.stdout


# -- sample / demo -----------------------------------------------------------------------------------------------
def test_cli_sample_grid_and_npz(cond_run_bundle, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from deploy_diff.runtime import Pipeline

    png = tmp_path / "grid.png"
    assert (
        main(
            [
                "sample",
                str(cond_run_bundle),
                "--scheduler",
                "dpmsolver++",
                "--steps",
                "5",
                "-n",
                "6",
                "--seed",
                "0",
                "--guidance",
                "2",
                "--class",
                "7",
                "--out",
                str(png),
                "--no-progress",
                "--nrow",
                "3",
            ]
        )
        == 0
    )
    assert "6 image(s), DPMSolverMultistepScheduler, 5 steps" in capsys.readouterr().out
    assert Image.open(png).size[0] > Image.open(png).size[1]  # 3 per row, 2 rows
    assert (
        main(
            [
                "sample",
                str(cond_run_bundle),
                "--steps",
                "4",
                "-n",
                "3",
                "--seed",
                "2",
                "--class",
                "1,2,3",
                "--npz",
                "--out",
                str(tmp_path / "s"),
                "--no-progress",
            ]
        )
        == 0
    )
    data = np.load(tmp_path / "s.npz")
    want = Pipeline.from_bundle(cond_run_bundle)(num_images=3, num_inference_steps=4, seed=2, class_labels=[1, 2, 3])
    np.testing.assert_array_equal(data["images"], want)
    np.testing.assert_array_equal(data["class_labels"], [1, 2, 3])


def test_cli_sample_errors_are_one_line(cond_run_bundle, tmp_path, capsys):
    assert (
        main(
            [
                "sample",
                str(cond_run_bundle),
                "--class",
                "12",
                "--steps",
                "2",
                "--out",
                str(tmp_path / "x.png"),
                "--no-progress",
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "class_labels must lie in 0..9" in err
    assert not (tmp_path / "x.png").exists()
    assert main(["sample", str(tmp_path / "nothing"), "--out", str(tmp_path / "x.png")]) == 1
    assert "BundleError" in capsys.readouterr().err


def test_cli_demo_runs_the_whole_chain(tmp_path, capsys):
    from PIL import Image

    assert main(["demo", "--out", str(tmp_path / "demo"), "--steps", "3", "--sample-steps", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "train (torch)" in out and "export + validate" in out and "sample 100" in out
    grid = Image.open(tmp_path / "demo" / "grid.png")
    assert grid.size == (10 * 33 + 1, 10 * 33 + 1)
    assert main(["demo", "--out", str(tmp_path / "demo"), "--steps", "3", "--sample-steps", "2", "--no-progress"]) == 0
    assert "reusing" in capsys.readouterr().out
