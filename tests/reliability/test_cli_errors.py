"""Bad input on every CLI subcommand (bad paths, a file for a folder, bad numbers, unknown scheduler names, a class
for an unconditional model, bad JSON) gives exactly one readable stderr line ``deploy-diff CMD: error: Type: what``,
exit status 1, no traceback and no output file; ``--debug`` (before or after the subcommand) shows the traceback;
argparse's usage errors exit 2. In-process calls of ``main`` and real ``python -m deploy_diff.cli`` processes.

Each test's docstring says what was tried, what the user sees, and what is kept.
"""

import re
from pathlib import Path

import pytest
from _reliability import one_error_line, run_cli

from deploy_diff.cli import main
from deploy_diff.runtime.bundle import BundleError


@pytest.fixture
def paths(tmp_path, cond_run_bundle, diffusers_bundle, cond_run_dir):
    (tmp_path / "notes.txt").write_text("not a bundle, not JSON\n")
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "unknown_key.json").write_text('{"train": {"steps": 5}, "no_such_key": 1}')
    (tmp_path / "empty").mkdir()
    (tmp_path / "torn_bundle").mkdir()
    (tmp_path / "torn_bundle" / "deploy_diff.json").write_text("{")
    return {
        "cond": str(cond_run_bundle),
        "uncond": str(diffusers_bundle),
        "run": str(cond_run_dir),
        "missing": str(tmp_path / "does-not-exist"),
        "file": str(tmp_path / "notes.txt"),
        "folder": str(tmp_path / "empty"),
        "bad_json": str(tmp_path / "bad.json"),
        "list_json": str(tmp_path / "list.json"),
        "unknown_key_json": str(tmp_path / "unknown_key.json"),
        "torn_bundle": str(tmp_path / "torn_bundle"),
        "new": str(tmp_path / "new" / "out.png"),
        "new_dir": str(tmp_path / "new_dir"),
    }


def _fill(argv, paths):
    """Replace the whole-word placeholders ``{name}`` by ``paths[name]`` (JSON arguments are left alone)."""
    return [paths[a[1:-1]] if a.startswith("{") and a.endswith("}") and a[1:-1] in paths else a for a in argv]


_SAMPLE = ["--out", "{new}", "--no-progress"]
CLI_CASES = [
    # timesteps (no bundle, no torch)
    (["timesteps", "--steps", "0"], "num_inference_steps=0 is outside [1, num_train_timesteps=1000]"),
    (["timesteps", "--steps", "-3"], "num_inference_steps=-3 is outside"),
    (["timesteps", "--steps", "1001"], "num_inference_steps=1001 is outside"),
    (["timesteps", "--scheduler", "nope"], "unknown scheduler 'nope'"),
    (["timesteps", "{missing}"], "no scheduler config at"),
    (["timesteps", "{folder}"], "no scheduler config at"),
    (["timesteps", "{bad_json}"], "is not valid JSON"),
    (["timesteps", "--set", "[1]"], "--set takes a JSON object"),
    (["timesteps", "--set", '{"beta_schedule": "nope"}'], "beta_schedule='nope' is not supported"),
    (["timesteps", "--set", '{"prediction_type": "x"}'], "prediction_type='x' is not supported"),
    pytest.param(["timesteps", "--set", "{bad"], "--set is not valid JSON", id="timesteps-set-invalid-json"),
    # schedules
    pytest.param(["schedules", "-T", "0"], "num-train-timesteps must be >= 1", id="schedules-T-0"),
    pytest.param(["schedules", "--beta-start", "nan"], "beta-start", id="schedules-beta-start-nan"),
    # inspect
    (["inspect", "{missing}"], "the folder does not exist"),
    (["inspect", "{file}"], "is a file, not a bundle folder"),
    (["inspect", "{folder}"], "has no deploy_diff.json"),
    (["inspect", "{torn_bundle}"], "is not valid JSON"),
    # sample
    (["sample", "{missing}", *_SAMPLE], "the folder does not exist"),
    (["sample", "{file}", *_SAMPLE], "is a file, not a bundle folder"),
    (["sample", "{cond}", "--steps", "0", *_SAMPLE], "--steps must be a positive int; got 0"),
    (["sample", "{cond}", "--steps", "-3", *_SAMPLE], "--steps must be a positive int; got -3"),
    (["sample", "{cond}", "--steps", "1001", *_SAMPLE], "--steps 1001 is outside"),
    (["sample", "{cond}", "--scheduler", "nope", *_SAMPLE], "unknown scheduler 'nope'"),
    (["sample", "{uncond}", "--class", "3", "--steps", "2", *_SAMPLE], "unconditional: class_labels must be None"),
    (["sample", "{uncond}", "--guidance", "2", "--steps", "2", *_SAMPLE], "pass guidance_scale=None"),
    (["sample", "{cond}", "--class", "11", "--steps", "2", *_SAMPLE], "class_labels must lie in 0..9"),
    (["sample", "{cond}", "-n", "0", "--steps", "2", *_SAMPLE], "num_images must be a positive int"),
    (["sample", "{cond}", "--seed", "-1", "--steps", "2", *_SAMPLE], "seed must lie in [0, 2**64)"),
    (["sample", "{cond}", "--guidance", "nan", "--steps", "2", *_SAMPLE], "--guidance must be a finite number"),
    (["sample", "{cond}", "--eta", "0.5", "--scheduler", "euler", "--steps", "2", *_SAMPLE], "only used by DDIM"),
    (["sample", "{cond}", "--threads", "0", "--steps", "2", *_SAMPLE], "num_threads must be a positive integer"),
    (["sample", "{cond}", "--precision", "fp16", "--steps", "2", *_SAMPLE], "has no fp16 graph"),
    (
        ["sample", "{cond}", "--steps", "2", "-n", "2", "--out", "{folder}", "--no-progress"],
        "is a folder; give a file name",
    ),
    pytest.param(["sample", "{cond}", "--nrow", "0", "--steps", "2", *_SAMPLE], "--nrow", id="sample-nrow-0"),
    pytest.param(["sample", "{cond}", "--nrow", "-1", "--steps", "2", *_SAMPLE], "--nrow", id="sample-nrow-negative"),
    pytest.param(["sample", "{cond}", "--scale", "0", "--steps", "2", *_SAMPLE], "--scale", id="sample-scale-0"),
    pytest.param(
        ["sample", "{cond}", "--scale", "-2", "--steps", "2", *_SAMPLE], "--scale", id="sample-scale-negative"
    ),
    # bench
    (["bench", "{missing}", "--no-baseline"], "the folder does not exist"),
    (["bench", "{cond}", "--no-baseline", "--steps", "0", "--repeats", "1", "--batch", "1"], "--steps 0"),
    (["bench", "{cond}", "--no-baseline", "--steps", "-3", "--repeats", "1", "--batch", "1"], "--steps -3"),
    (["bench", "{cond}", "--no-baseline", "--steps", "2", "--repeats", "1", "--batch", "0"], "--batch [0]"),
    (["bench", "{cond}", "--no-baseline", "--scheduler", "nope"], "unknown scheduler 'nope'"),
    (["bench", "{cond}", "--no-baseline", "--threads", "0"], "num_threads must be a positive integer"),
    pytest.param(
        ["bench", "{cond}", "--no-baseline", "--steps", "2", "--repeats", "0", "--batch", "1"],
        "repeats",
        id="bench-repeats-0",
    ),
    pytest.param(
        ["bench", "{cond}", "--no-baseline", "--steps", "2", "--repeats", "-1", "--batch", "1"],
        "repeats",
        id="bench-repeats-negative",
    ),
    # export
    (["export", "{missing}", "--out", "{new_dir}"], "is not a folder"),
    (["export", "{file}", "--out", "{new_dir}"], "is not a folder"),
    (["export", "{folder}", "--out", "{new_dir}"], "has no config.json"),
    (["export", "--from-diffusers", "{missing}", "--out", "{new_dir}"], "is not a folder"),
    (["export", "--from-diffusers", "{folder}", "--out", "{new_dir}"], "neither a diffusers pipeline folder"),
    (["export", "--out", "{new_dir}"], "give exactly one source"),
    (["export", "{run}", "--opset", "3", "--out", "{new_dir}"], "--opset must be an integer >= 17"),
    (["export", "{run}", "--static-batch", "0", "--out", "{new_dir}"], "--static-batch must be a positive integer"),
    (["export", "{run}", "--out", "{file}"], "exists and is not a folder"),
    # train
    (["train", "--out", "{new_dir}", "--steps", "0"], "steps must be an int >= 1 (got 0)"),
    (["train", "--out", "{new_dir}", "--steps", "-3"], "steps must be an int >= 1 (got -3)"),
    (["train", "--out", "{new_dir}", "--config", "{missing}"], "does not exist"),
    (["train", "--out", "{new_dir}", "--config", "{bad_json}"], "is not valid JSON"),
    (["train", "--out", "{new_dir}", "--config", "{list_json}"], "must hold a JSON object"),
    (["train", "--out", "{new_dir}", "--config", "{unknown_key_json}"], "unknown key 'no_such_key'"),
    (["train", "--out", "{new_dir}", "--data", "{missing}", "--steps", "1"], "does not exist"),
    (["train", "--out", "{new_dir}", "--data", "{file}", "--steps", "1"], "expected 'digits', a folder of images"),
    (["train", "--out", "{new_dir}", "--beta-schedule", "nope", "--steps", "1"], "beta_schedule='nope'"),
    (["train", "--out", "{new_dir}", "--channels", "0", "--steps", "1"], "in_channels must be a positive int"),
    (["train", "--out", "{new_dir}", "--lr", "-1", "--steps", "1"], "lr must be > 0"),
    (["train", "--out", "{file}", "--steps", "1", "--no-progress"], "Not a directory"),
    (["train", "--out", "{missing}", "--resume", "--steps", "1"], "is not a folder"),
    (["train", "--out", "{folder}", "--resume", "--steps", "1"], "holds no complete deploy-diff checkpoint"),
    # demo
    (["demo", "--out", "{new_dir}", "--steps", "0", "--no-progress"], "--steps and --sample-steps must be >= 1"),
    (["demo", "--out", "{new_dir}", "--steps", "-3", "--no-progress"], "--steps and --sample-steps must be >= 1"),
]


def _case_id(case) -> str:
    if hasattr(case, "id") and case.id:
        return case.id
    words = [
        "minus" + a[1:] if re.fullmatch(r"-[0-9.]+", a) else a
        for a in case[0]
        if a not in ("--no-progress", "--out", "{new}")
    ]
    return re.sub(r"[^A-Za-z0-9_.+=]+", "-", " ".join(words)).strip("-")[:60]


@pytest.mark.parametrize("argv, message", CLI_CASES, ids=[_case_id(c) for c in CLI_CASES])
def test_cli_bad_input_is_one_line_and_non_zero(paths, capsys, argv, message):
    """Every subcommand given a bad path, a file for a folder, a bad number, an unknown scheduler name, a class for an
    unconditional model or bad JSON exits 1 with one line `deploy-diff CMD: error: <Type>: <what>` on stderr and no
    traceback, and writes no output file or folder."""
    argv = _fill(argv, paths)
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 1, f"exit status {rc} for {argv}; stderr: {err!r}"
    line = one_error_line(err, argv[0])
    assert message in line
    assert not Path(paths["new"]).exists() and not Path(paths["new_dir"]).exists()


@pytest.mark.parametrize("option", ["--scheduler=nope", "--sample-steps=0"])
def test_cli_demo_checks_its_sampling_options_before_training(paths, capsys, monkeypatch, option):
    """`demo --scheduler nope` (or `--sample-steps 0`) should be refused at once, not after minutes of training and
    exporting; here training is replaced by a stub that fails, so the error must come before it is reached."""
    import deploy_diff.train.trainer as trainer

    def no_training(*args, **kwargs):
        raise RuntimeError("demo started training before checking its sampling options")

    monkeypatch.setattr(trainer, "train", no_training)
    rc = main(["demo", "--out", paths["new_dir"], "--steps", "1", "--no-progress", option])
    line = one_error_line(capsys.readouterr().err, "demo")
    assert rc == 1 and ("unknown scheduler 'nope'" in line or "--sample-steps must be >= 1" in line), line


def test_cli_debug_flag_raises_the_exception_in_process(paths):
    """`deploy-diff --debug inspect MISSING` re-raises the original BundleError (a traceback) instead of the one-line
    summary, so a developer sees where it came from."""
    with pytest.raises(BundleError, match="does not exist"):
        main(["--debug", "inspect", paths["missing"]])


@pytest.mark.parametrize(
    "argv, command, message",
    [
        (["timesteps", "--steps", "0"], "timesteps", "num_inference_steps=0 is outside"),
        (["inspect", "{missing}"], "inspect", "BundleError: no bundle at"),
        (["sample", "{file}", "--out", "{new}", "--no-progress"], "sample", "is a file, not a bundle folder"),
    ],
    ids=["timesteps-steps-0", "inspect-missing", "sample-file"],
)
def test_cli_process_prints_one_line_and_exits_1(paths, argv, command, message):
    """A real `python -m deploy_diff.cli` process given a bad number or path exits 1 with one stderr line naming the
    problem, prints nothing on stdout, and shows no traceback."""
    out = run_cli(*_fill(argv, paths))
    assert out.returncode == 1, out.stderr
    assert message in one_error_line(out.stderr, command)
    assert out.stdout == ""


def test_cli_process_with_debug_shows_the_traceback(paths):
    """`deploy-diff --debug inspect MISSING` in a real process exits 1 and prints the full traceback ending in the
    BundleError, for bug reports."""
    out = run_cli("--debug", "inspect", paths["missing"])
    assert out.returncode == 1
    assert "Traceback (most recent call last)" in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("deploy_diff.runtime.bundle.BundleError: no bundle at")


def test_cli_process_usage_errors_exit_2_with_argparse_usage(paths):
    """A malformed option (`--steps abc`, `--class a`, a missing required --out) is argparse's usage error: exit 2,
    a usage block and a last line `deploy-diff CMD: error: argument ...`, no traceback (argparse's standard, kept)."""
    for argv, command, message in [
        (["sample", paths["cond"], "--steps", "abc", "--out", paths["new"]], "sample", "argument --steps: invalid int"),
        (
            ["sample", paths["cond"], "--class", "a", "--out", paths["new"]],
            "sample",
            "argument --class: expected a class index",
        ),
        (["train", "--steps", "3"], "train", "the following arguments are required: --out"),
    ]:
        out = run_cli(*argv)
        assert out.returncode == 2, out.stderr
        lines = out.stderr.strip().splitlines()
        assert lines[0].startswith(f"usage: deploy-diff {command}")
        assert lines[-1].startswith(f"deploy-diff {command}: error: ") and message in lines[-1], lines[-1]
        assert "Traceback" not in out.stderr


def test_cli_debug_after_the_subcommand_is_accepted(paths, capsys):
    """`deploy-diff inspect MISSING --debug` (the flag where users put it) should show the traceback too."""
    try:
        main(["inspect", paths["missing"], "--debug"])
        outcome = "returned"
    except BundleError:
        outcome = "traceback"
    except SystemExit as e:
        outcome = f"usage error, exit {e.code}"
    assert outcome == "traceback", capsys.readouterr().err
