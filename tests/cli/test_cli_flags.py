"""Library errors name library arguments (``resume=True``, ``steps``, ``lr``); the command line shows the same
errors with its own flags (``--resume``, ``--steps``, ``--lr``). Each case triggers the real library error through
``deploy-diff train`` and checks the one line a user reads."""

import json

import numpy as np
import pytest

from deploy_diff.cli import COMMANDS, build_parser, main
from deploy_diff.cli._common import error_line
from deploy_diff.train.checkpoint import sha256_file

TINY_FLAGS = ["--base-channels", "16", "--channel-mult", "1,2", "--attention-resolutions", "4", "--num-heads", "2"]


def _error(capsys, command: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"deploy-diff {command}: error: "), lines[0]
    return lines[0]


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--steps", "40"],
            "already holds a checkpoint: pass --resume to continue it, or choose another --out "
            "(nothing was overwritten)",
        ),
        (
            ["--steps", "1", "--resume"],
            "ValueError: the checkpoint is at step 30, past --steps 1: raise --steps to train further",
        ),
        (
            ["--steps", "40", "--resume", "--beta-schedule", "cosine"],
            "ValueError: --resume: beta_schedule='cosine' differs from the checkpoint's 'linear'",
        ),
        (
            ["--steps", "40", "--resume", "--base-channels", "8"],
            "ValueError: --resume: the model config differs from the checkpoint's; resume takes the architecture from "
            "the checkpoint (drop the model options)",
        ),
    ],
    ids=["no-resume", "past-steps", "forward-process-differs", "model-differs"],
)
def test_train_refusals_of_an_existing_run_name_the_flags(cond_run_dir, capsys, flags, message):
    before = {p.name: sha256_file(p) for p in cond_run_dir.iterdir() if p.is_file()}
    assert main(["train", "--out", str(cond_run_dir), "--no-progress", *flags]) == 1
    line = _error(capsys, "train")
    assert message in line
    assert "resume=True" not in line and "out_dir" not in line and "model_config=None" not in line
    assert before == {p.name: sha256_file(p) for p in cond_run_dir.iterdir() if p.is_file()}


def test_train_data_and_config_errors_name_the_flags(tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("not images")
    assert main(["train", "--out", str(tmp_path / "run"), "--data", str(notes), "--steps", "1"]) == 1
    assert f"ValueError: --data {notes}: expected 'digits', a folder of images, or a .npy/.npz file" in _error(
        capsys, "train"
    )
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"steps": 2, "no_such_key": 1}))
    assert main(["train", "--out", str(tmp_path / "run"), "--config", str(cfg)]) == 1
    assert f"ValueError: --config {cfg}: unknown key 'no_such_key'" in _error(capsys, "train")
    assert not (tmp_path / "run").exists()


def test_train_divergence_names_the_lr_flag(tmp_path, capsys):
    data = tmp_path / "images.npy"
    np.save(data, np.random.default_rng(0).integers(0, 256, (16, 8, 8), dtype=np.uint8))
    argv = [
        "train",
        "--data",
        str(data),
        "--out",
        str(tmp_path / "run"),
        "--steps",
        "5",
        "--lr",
        "1e30",
        "--max-grad-norm",
        "0",
        "--warmup-steps",
        "0",
        "--batch-size",
        "4",
        "--sample-every",
        "0",
        "--save-every",
        "0",
        "--device",
        "cpu",
        "--no-progress",
        *TINY_FLAGS,
    ]
    assert main(argv) == 1
    line = _error(capsys, "train")
    assert "FloatingPointError: loss became" in line and "lower --lr or use mixed_precision='no'" in line


def test_flag_words_leave_other_messages_alone():
    """The mapping rewrites only the phrases it lists: a config error that names the field keeps the field."""
    words = COMMANDS["train"].FLAG_WORDS
    plain = ValueError("invalid training config: steps must be an int >= 1 (got 0)")
    assert error_line("train", plain, words) == (
        "deploy-diff train: error: ValueError: invalid training config: steps must be an int >= 1 (got 0)"
    )
    coloured = RuntimeError("\x1b[31mred\x1b[0m\n  two lines")
    assert error_line("sample", coloured) == "deploy-diff sample: error: RuntimeError: red two lines"


def test_every_subcommand_module_registers_itself():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert list(sub.choices) == list(COMMANDS)
    for name, module in COMMANDS.items():
        assert module.NAME == name
        assert sub.choices[name].get_default("func") is module.run


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--static-batch", "0"], "ExportError: --static-batch must be a positive integer; got 0"),
        (["--opset", "3"], "ExportError: --opset must be an integer >= 17; got 3"),
        (["--out", "{file}"], "ExportError: --out {file} exists and is not a folder; refusing to overwrite it"),
        (["--out", "{folder}"], "ExportError: --out {folder} is a folder that is not a bundle"),
    ],
    ids=["static-batch-0", "opset-3", "out-is-a-file", "out-is-not-a-bundle"],
)
def test_export_refusals_name_the_flags(cond_run_dir, tmp_path, capsys, flags, message):
    paths = {"{file}": str(tmp_path / "notes.txt"), "{folder}": str(tmp_path / "folder")}
    (tmp_path / "notes.txt").write_text("not a bundle")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.txt").write_text("not a bundle")
    argv = ["export", str(cond_run_dir), "--out", str(tmp_path / "new"), *[paths.get(a, a) for a in flags]]
    assert main(argv) == 1
    line = _error(capsys, "export")
    for key, value in paths.items():
        message = message.replace(key, value)
    assert message in line
    assert "static_batch" not in line and "out=" not in line
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--backend", "tensorrt"], "has no TensorRT engine (export with --tensorrt on the GPU that will run it)"),
        (["--precision", "fp16"], "has no fp16 graph (export with --fp16 to add one)"),
    ],
    ids=["no-engine", "no-fp16-graph"],
)
def test_sample_hints_name_the_export_flags(cond_run_bundle, tmp_path, capsys, flags, message):
    argv = ["sample", str(cond_run_bundle), "--steps", "2", "--out", str(tmp_path / "x.png"), "--no-progress", *flags]
    assert main(argv) == 1
    line = _error(capsys, "sample")
    assert message in line and "export_bundle(" not in line
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize(
    "option, message",
    [
        ("--guidance=nan", "--guidance must be a finite number >= 0; got nan"),
        ("--guidance=-1", "--guidance must be a finite number >= 0; got -1.0"),
        ("--sample-steps=-2", "--steps and --sample-steps must be >= 1; got 1, -2"),
    ],
)
def test_demo_checks_its_sampling_options_with_the_library_rules_before_training(
    tmp_path, capsys, monkeypatch, option, message
):
    """demo asks the runtime's argument rules (runtime/arguments.py) about --guidance and --sample-steps before it
    trains, and names its flags when they refuse."""
    import deploy_diff.train.trainer as trainer

    def no_training(*args, **kwargs):
        raise RuntimeError("demo started training before checking its sampling options")

    monkeypatch.setattr(trainer, "train", no_training)
    assert main(["demo", "--out", str(tmp_path / "demo"), "--steps", "1", "--no-progress", option]) == 1
    assert f"ValueError: {message}" in _error(capsys, "demo")
    assert not (tmp_path / "demo").exists()
