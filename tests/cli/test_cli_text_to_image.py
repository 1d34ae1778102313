"""`deploy-diff sample` on a text-to-image bundle: the grid and the .npz hold the Python API's images, the defaults
are diffusers' (50 steps, guidance 7.5, one image per prompt), and flags of the other bundle kind are refused."""

import numpy as np
import pytest
from PIL import Image

from deploy_diff.cli import main
from deploy_diff.runtime import TextToImagePipeline
from deploy_diff.runtime.images import image_grid, to_uint8


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("deploy-diff sample: error: ")
    return err[0]


def test_grid_and_npz_hold_the_apis_images(sd_bundle, tmp_path, capsys):
    flags = ["--prompt", "a lighthouse at dusk", "--negative-prompt", "blurry", "--steps", "4", "--guidance", "5"]
    flags += ["--seed", "1", "-n", "3", "--height", "24", "--width", "16", "--scheduler", "euler", "--no-progress"]
    png = tmp_path / "grid.png"
    assert main(["sample", str(sd_bundle), *flags, "--out", str(png), "--nrow", "3", "--scale", "2"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("3 image(s), EulerDiscreteScheduler, 4 steps, OnnxRuntime fp32") and str(png) in line
    pipe = TextToImagePipeline.from_bundle(sd_bundle, scheduler="euler")
    want = pipe("a lighthouse at dusk", negative_prompt="blurry", num_images_per_prompt=3, num_inference_steps=4,
                guidance_scale=5, seed=1, height=24, width=16)  # fmt: skip
    grid = np.asarray(Image.open(png).convert("RGB"))
    np.testing.assert_array_equal(grid, image_grid(to_uint8(want), nrow=3, scale=2))
    npz = tmp_path / "images.npz"
    assert main(["sample", str(sd_bundle), *flags, "--npz", "--out", str(npz)]) == 0
    with np.load(npz) as data:
        np.testing.assert_array_equal(data["images"], want)
        assert str(data["prompt"]) == "a lighthouse at dusk" and str(data["negative_prompt"]) == "blurry"
        assert int(data["steps"]) == 4 and float(data["guidance_scale"]) == 5.0 and int(data["seed"]) == 1


def test_defaults_are_diffusers(sd_bundle, tmp_path, capsys):
    png = tmp_path / "one.png"
    assert main(["sample", str(sd_bundle), "--prompt", "a cat", "--seed", "0", "--out", str(png), "--no-progress"]) == 0
    assert capsys.readouterr().out.startswith("1 image(s), PNDMScheduler, 50 steps")
    want = TextToImagePipeline.from_bundle(sd_bundle)("a cat", seed=0)  # 50 steps, guidance 7.5, 16x16
    assert want.shape == (1, 16, 16, 3)
    np.testing.assert_array_equal(np.asarray(Image.open(png).convert("RGB")), image_grid(to_uint8(want), scale=8))


@pytest.mark.parametrize(
    "flags, message",
    [
        ([], "is a text-to-image bundle: give --prompt TEXT"),
        (["--prompt", "a", "--class", "3"], "--class is for pixel-space bundles; "),
        (["--prompt", "a", "--height", "18"], "ValueError: --height must be a positive int divisible by 4 (the VAE's"),
        (["--prompt", "a", "-n", "0"], "ValueError: -n must be a positive int; got 0"),
        (["--prompt", "a", "--guidance", "nan"], "ValueError: --guidance must be a finite number"),
        (["--prompt", "a", "--scheduler", "ddim", "--eta", "-1"], "eta must be a finite number >= 0"),
    ],
    ids=["no-prompt", "class", "height", "n", "guidance", "eta"],
)
def test_text_to_image_refusals_name_the_flags(sd_bundle, tmp_path, capsys, flags, message):
    out = tmp_path / "x.png"
    assert main(["sample", str(sd_bundle), "--steps", "2", "--no-progress", "--out", str(out), *flags]) == 1
    assert message in _error(capsys)
    assert not out.exists()


@pytest.mark.parametrize(
    "flags", [["--prompt", "a cat"], ["--negative-prompt", "x"], ["--height", "16", "--width", "16"]]
)
def test_text_flags_on_a_pixel_bundle_are_refused(diffusers_bundle, tmp_path, capsys, flags):
    out = tmp_path / "x.png"
    assert main(["sample", str(diffusers_bundle), "--steps", "2", "--out", str(out), *flags]) == 1
    line = _error(capsys)
    assert "is for text-to-image bundles;" in line and "is a pixel-space UNet bundle" in line
    assert flags[0] in line and not out.exists()


def test_help_names_the_text_to_image_flags(capsys):
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    text = capsys.readouterr().out
    for flag in ("--prompt", "--negative-prompt", "--height", "--width", "images per prompt", "default 7.5"):
        assert flag in text
