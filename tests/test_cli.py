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
    code = ("import sys; sys.modules['torch'] = None; from deploy_diff.cli import main; "
            "sys.exit(main(['timesteps', '--scheduler', 'ddim', '--steps', '3']))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "666 333 0" in out.stdout
