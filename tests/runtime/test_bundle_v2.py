"""Manifest format 2: new pixel bundles (``"pipeline": "unet"``) and text-to-image bundles are read, format-1
bundles still load and sample the same, and a text-to-image manifest missing a graph, its tokenizer or a fact is
refused naming what is missing. Pixel-only paths refuse a text-to-image bundle naming TextToImagePipeline."""

import json
import shutil

import numpy as np
import pytest

from deploy_diff.cli import main
from deploy_diff.runtime import Pipeline
from deploy_diff.runtime.bundle import (
    BUNDLE_FORMAT_VERSION,
    BundleError,
    ModelInfo,
    TextToImageInfo,
    load_bundle,
)
from deploy_diff.serving._common import require_pixel_bundle


def edited(bundle, tmp_path, edit, name="edited"):
    """A copy of ``bundle`` whose manifest ``edit(manifest)`` changed (the manifest itself is not hashed)."""
    copy = tmp_path / name
    shutil.copytree(bundle, copy)
    path = copy / "deploy_diff.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
    return copy


# -- pixel bundles ------------------------------------------------------------------------------------------------
def test_a_new_pixel_bundle_is_format_2_with_a_unet_graph_table(diffusers_bundle):
    bundle = load_bundle(diffusers_bundle)
    m = bundle.manifest
    assert BUNDLE_FORMAT_VERSION == 2 and m["format_version"] == 2 and m["pipeline"] == "unet"
    assert m["graphs"] == {
        "unet": {
            "files": {"fp32": "unet.onnx", "fp16": "unet.fp16.onnx"},
            "inputs": m["model"]["inputs"],
            "outputs": m["model"]["outputs"],
        }
    }
    assert isinstance(bundle.model, ModelInfo) and bundle.pipeline == "unet" and bundle.components == ("unet",)
    assert bundle.precisions == ("fp32", "fp16")
    assert bundle.graph_path() == bundle.graph_path("fp32", "unet") == diffusers_bundle / "unet.onnx"


def _as_format_1(manifest):
    del manifest["pipeline"]
    manifest["format_version"] = 1
    manifest["graphs"] = {p: name for p, name in manifest["graphs"]["unet"]["files"].items()}


def test_format_1_bundles_load_and_sample_as_before(diffusers_bundle, tmp_path):
    old = edited(diffusers_bundle, tmp_path, _as_format_1)
    b1, b2 = load_bundle(old), load_bundle(diffusers_bundle)
    assert (b1.pipeline, b1.components, b1.precisions) == ("unet", ("unet",), ("fp32", "fp16"))
    assert b1.model == b2.model and b1.graphs["unet"] == b2.graphs["unet"]
    kwargs = dict(num_images=2, num_inference_steps=3, seed=5)
    a = Pipeline.from_bundle(old, scheduler="ddim")(**kwargs)
    b = Pipeline.from_bundle(diffusers_bundle, scheduler="ddim")(**kwargs)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda m: m.update(format_version=3), "format_version 3; this deploy-diff reads versions 1..2"),
        (lambda m: m.pop("pipeline"), "has pipeline None; expected one of \\['unet', 'text-to-image'\\]"),
        (lambda m: m.update(pipeline="video"), "has pipeline 'video'"),
        (lambda m: m.update(graphs={"fp32": "unet.onnx"}), "missing the unet graph"),  # a format-1 table in v2
        (lambda m: m["graphs"]["unet"]["files"].pop("fp32"), "missing the unet graph \\(graphs.unet has no fp32\\)"),
        (lambda m: m["graphs"]["unet"]["files"].update(int8="unet.onnx"), "'int8' graph; precisions are"),
        (
            lambda m: m["graphs"]["unet"]["files"].update(fp16="other.onnx"),
            "lists no other.onnx in its `files` table \\(graphs.unet.fp16 names it\\)",
        ),
    ],
)
def test_a_bad_format_2_pixel_manifest_is_refused(diffusers_bundle, tmp_path, edit, words):
    with pytest.raises(BundleError, match=words):
        load_bundle(edited(diffusers_bundle, tmp_path, edit))


# -- text-to-image bundles ----------------------------------------------------------------------------------------
def test_a_text_to_image_bundle_reads_its_graphs_and_facts(sd_bundle):
    bundle = load_bundle(sd_bundle)
    assert bundle.pipeline == "text-to-image" and bundle.components == ("text_encoder", "unet", "vae_decoder")
    info = bundle.model
    assert isinstance(info, TextToImageInfo)
    assert (info.sample_size, info.vae_scale_factor, info.image_channels, info.text_hidden_size) == ((8, 8), 2, 3, 32)
    assert (info.model_max_length, info.pad_token, info.tokenizer_file) == (77, "<|endoftext|>", "tokenizer.json")
    assert (info.size_multiple, info.latent_multiple) == (4, 2)  # VAE factor 2 times the UNet's 2 (two blocks)
    assert bundle.tokenizer_path == sd_bundle / "tokenizer.json"
    for component in bundle.components:
        assert bundle.component_precisions(component) == ("fp32", "fp16")
        assert bundle.graph_path("fp32", component) == sd_bundle / f"{component}.onnx"
    assert bundle.graphs["text_encoder"].inputs == {"input_ids": {"dtype": "int64", "shape": ["batch", "seq"]}}
    with pytest.raises(BundleError, match="has no safety_checker graph; its components are \\['text_encoder'"):
        bundle.graph_path("fp32", "safety_checker")
    with pytest.raises(ValueError, match="precision must be one of"):
        bundle.graph_path("bf16", "unet")


def test_a_bundle_without_size_multiple_takes_multiples_of_the_vae_factor(sd_bundle, tmp_path):
    """Bundles written before model.size_multiple was recorded load as before: sides are multiples of the VAE's
    factor alone."""
    info = load_bundle(edited(sd_bundle, tmp_path, lambda m: m["model"].pop("size_multiple"))).model
    assert (info.size_multiple, info.latent_multiple) == (2, 1)


def test_a_left_out_fp16_graph_says_why(sd_bundle, tmp_path):
    def drop(m):
        m["graphs"]["vae_decoder"]["files"].pop("fp16")
        m["export"]["fp16_skipped"] = {"vae_decoder": "an activation overflows fp16 (above 65504)"}

    bundle = load_bundle(edited(sd_bundle, tmp_path, drop))
    assert bundle.component_precisions("vae_decoder") == ("fp32",) and bundle.precisions == ("fp32", "fp16")
    with pytest.raises(BundleError, match="no fp16 vae_decoder graph \\(not written at export: an activation ove"):
        bundle.graph_path("fp16", "vae_decoder")


def _drop_tokenizer(m):
    m["files"].pop("tokenizer.json")


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda m: m["graphs"].pop("vae_decoder"), "missing the vae_decoder graph"),
        (lambda m: m["graphs"].pop("text_encoder"), "missing the text_encoder graph"),
        (lambda m: m["graphs"]["text_encoder"]["files"].pop("fp32"), "missing the text_encoder graph"),
        (_drop_tokenizer, "has no tokenizer: its manifest lists no tokenizer.json"),
        (lambda m: m["model"]["tokenizer"].pop("pad_token"), "malformed \\(KeyError: 'pad_token'\\)"),
        (lambda m: m["model"]["tokenizer"].update(model_max_length=1), "model_max_length must be an int in \\[2,"),
        (lambda m: m["model"].update(scaling_factor=0), "scaling_factor must be a positive number; got 0"),
        (lambda m: m["model"].update(sample_size=[8, 10**6]), "sample_size must be two ints in \\[1, 8192\\]"),
        (lambda m: m["model"].update(vae_scale_factor="8"), "vae_scale_factor must be an int"),
        (lambda m: m["model"].update(size_multiple=3), "size_multiple=3 is not a multiple of vae_scale_factor=2"),
        (lambda m: m["model"].update(size_multiple=True), "size_multiple must be an int in \\[1, 8192\\]"),
        (lambda m: m["model"].update(size_multiple=32), "sample_size \\[8, 8\\] is not a multiple of the latent sides"),
        (lambda m: m["graphs"]["unet"]["inputs"].pop("encoder_hidden_states"), "lacks the inputs"),
    ],
)
def test_a_text_to_image_manifest_missing_something_is_refused(sd_bundle, tmp_path, edit, words):
    with pytest.raises(BundleError, match=words):
        load_bundle(edited(sd_bundle, tmp_path, edit))


def test_a_missing_tokenizer_file_is_refused(sd_bundle, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(sd_bundle, copy)
    (copy / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match="is missing tokenizer.json"):
        load_bundle(copy)


def test_pixel_only_paths_refuse_a_text_to_image_bundle(sd_bundle):
    with pytest.raises(ValueError, match="'text-to-image' pipeline: load it with .*TextToImagePipeline"):
        Pipeline.from_bundle(sd_bundle)
    with pytest.raises(ValueError, match="'text-to-image' pipeline .*TextToImagePipeline"):
        require_pixel_bundle(sd_bundle)


def test_inspect_shows_each_component(sd_bundle, capsys):
    assert main(["inspect", str(sd_bundle)]) == 0
    out = capsys.readouterr().out
    assert "format deploy-diff/bundle v2" in out and "text-to-image: text_encoder -> unet -> vae_decoder" in out
    assert "latents 4x8x8 -> images 3x16x16 (VAE factor 2, scaling_factor 0.18215)" in out
    assert "unet        fp32 unet.onnx, fp16 unet.fp16.onnx" in out and "validated fp16" in out
    assert main(["inspect", str(sd_bundle), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["pipeline"] == "text-to-image"
