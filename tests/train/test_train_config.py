"""``resolve_train_configs``: the precedence of a run's settings (explicit settings > config file > a resumed
checkpoint's settings > defaults), flat and sectioned config files, and the image-folder model defaults."""

import json

import pytest

from deploy_diff.train.config import TrainConfig, resolve_train_configs
from deploy_diff.train.unet import UNetConfig


def _write(path, data):
    path.write_text(json.dumps(data))
    return path


def test_defaults_without_a_file_or_settings(tmp_path):
    model, train = resolve_train_configs(tmp_path / "run")
    assert model == UNetConfig() and train == TrainConfig()


def test_explicit_settings_beat_the_file_and_the_file_beats_defaults(tmp_path):
    cfg = _write(
        tmp_path / "cfg.json", {"model": {"base_channels": 16, "num_heads": 2}, "train": {"steps": 7, "lr": 0.01}}
    )
    model, train = resolve_train_configs(
        tmp_path / "run", config_file=cfg, model_overrides={"num_heads": 4}, train_overrides={"lr": 0.5}
    )
    assert (model.base_channels, model.num_heads) == (16, 4)
    assert (train.steps, train.lr, train.batch_size) == (7, 0.5, TrainConfig().batch_size)


def test_a_flat_file_is_sorted_into_model_and_train(tmp_path):
    cfg = _write(tmp_path / "cfg.json", {"base_channels": 16, "steps": 9, "hflip": True})
    model, train = resolve_train_configs(tmp_path / "run", config_file=cfg)
    assert model.base_channels == 16 and (train.steps, train.hflip) == (9, True)


def test_an_unknown_file_key_names_the_file_and_the_key(tmp_path):
    cfg = _write(tmp_path / "cfg.json", {"train": {"steps": 5}, "no_such_key": 1})
    with pytest.raises(ValueError, match=r"config file .*cfg\.json: unknown key 'no_such_key'"):
        resolve_train_configs(tmp_path / "run", config_file=cfg)


def test_a_folder_of_images_defaults_to_rgb_at_32_px_unless_told(tmp_path):
    model, train = resolve_train_configs(tmp_path / "run", train_overrides={"data": str(tmp_path / "faces")})
    assert (model.in_channels, model.out_channels, model.sample_size) == (3, 3, 32)
    assert train.data == str(tmp_path / "faces")
    model, _ = resolve_train_configs(
        tmp_path / "run",
        train_overrides={"data": str(tmp_path / "faces")},
        model_overrides={"in_channels": 1, "out_channels": 1, "sample_size": 16},
    )
    assert (model.in_channels, model.out_channels, model.sample_size) == (1, 1, 16)
    model, _ = resolve_train_configs(tmp_path / "run", train_overrides={"data": str(tmp_path / "x.npz")})
    assert (model.in_channels, model.sample_size) == (UNetConfig().in_channels, UNetConfig().sample_size)


def test_resume_takes_the_checkpoints_settings_under_the_file_and_explicit_ones(cond_run_dir, tmp_path):
    saved = json.loads((cond_run_dir / "config.json").read_text())["train"]
    model, train = resolve_train_configs(cond_run_dir, resume=True)
    assert model is None  # the trainer takes the architecture from the checkpoint
    assert train.to_dict() == TrainConfig.from_dict(saved).to_dict()
    cfg = _write(tmp_path / "cfg.json", {"train": {"steps": 50, "log_every": 3}})
    model, train = resolve_train_configs(cond_run_dir, resume=True, config_file=cfg, train_overrides={"steps": 60})
    assert model is None
    assert (train.steps, train.log_every, train.batch_size) == (60, 3, saved["batch_size"])
    model, _ = resolve_train_configs(cond_run_dir, resume=True, model_overrides={"base_channels": 16})
    assert model is not None and model.base_channels == 16  # given: the trainer checks it against the checkpoint
