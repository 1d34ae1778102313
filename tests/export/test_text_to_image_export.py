"""Export of a StableDiffusionPipeline folder to a text-to-image bundle: the manifest (format 2), each graph against
its torch module on inputs the export never saw, the tokenizer against transformers, the fp16 graphs (sensitive ops
kept fp32, an overflowing VAE decoder left out and said why), and the refusals (other pipeline classes by name,
UNet options the graphs cannot take, options that do not apply). One tiny pipeline, exported once per session
(``sd_folder`` / ``sd_bundle`` in conftest.py)."""

import json
import random
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from deploy_diff.cli import main
from deploy_diff.export import ExportError, export_text_to_image, load_diffusers_source, load_text_to_image_source
from deploy_diff.export.sources import diffusers_pipeline_kind
from deploy_diff.export.text_to_image import TOKENIZER_PROBES, _components, _export_component
from deploy_diff.export.validate import TOLERANCES
from deploy_diff.runtime._numeric import relative_error
from deploy_diff.runtime.bundle import TextToImageInfo, load_bundle
from deploy_diff.runtime.tokenizer import PromptTokenizer

FP32_TOL = TOLERANCES["fp32"]  # relative_error: max|onnx - torch| / max(1, max|torch|)
FP16_TOL = TOLERANCES["fp16"]


def ort_run(graph, feeds):
    sess = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


def dims(value):
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


@pytest.fixture(scope="module")
def reference(sd_folder):
    """diffusers' own components loaded from the folder (what StableDiffusionPipeline.from_pretrained loads)."""
    from _sd import load_diffusers_sd

    return load_diffusers_sd(sd_folder)


def test_manifest_is_format_2_text_to_image(sd_bundle, reference):
    bundle = load_bundle(sd_bundle)
    m = bundle.manifest
    assert (m["format_version"], m["pipeline"], bundle.pipeline) == (2, "text-to-image", "text-to-image")
    assert bundle.components == ("text_encoder", "unet", "vae_decoder")
    graphs = {f"{c}{p}.onnx" for c in bundle.components for p in ("", ".fp16")}
    assert set(m["files"]) == {"tokenizer.json", "scheduler_config.json", *graphs}
    unet, vae, tok = reference.unet.config, reference.vae.config, reference.tokenizer
    info = bundle.model
    assert isinstance(info, TextToImageInfo)
    assert info.sample_size == (unet.sample_size, unet.sample_size) and info.in_channels == info.out_channels == 4
    assert info.vae_scale_factor == reference.vae_scale_factor == 2 and info.scaling_factor == vae.scaling_factor
    unet_factor = 2 ** (len(unet.block_out_channels) - 1)  # the UNet's downsamplers: latent sides it takes
    assert m["model"]["size_multiple"] == info.size_multiple == 2 * unet_factor == 4
    assert info.text_hidden_size == reference.text_encoder.config.hidden_size == unet.cross_attention_dim
    assert (info.model_max_length, info.pad_token, info.pad_token_id) == (77, tok.pad_token, tok.pad_token_id)
    assert (info.bos_token_id, info.eos_token_id) == (tok.bos_token_id, tok.eos_token_id)
    assert info.unet_inputs == ("sample", "timestep", "encoder_hidden_states") and info.static_batch is None
    assert m["model"]["source"]["class"] == "StableDiffusionPipeline" and m["model"]["prediction_type"] == "epsilon"
    assert bundle.scheduler_config()["_class_name"] == "PNDMScheduler"
    assert m["graphs"]["unet"]["inputs"]["sample"]["shape"] == ["batch", 4, "height", "width"]
    assert m["graphs"]["vae_decoder"]["outputs"]["sample"]["shape"] == ["batch", 3, "2*height", "2*width"]
    validation = m["export"]["validation"]
    for component in bundle.components:
        assert validation[component]["fp32"]["max_error"] <= FP32_TOL
        assert validation[component]["fp16"]["max_error"] <= FP16_TOL
        assert bundle.graph_path("fp16", component).name == f"{component}.fp16.onnx"
    assert {tuple(c["size"]) for c in validation["unet"]["fp32"]["cases"]} == {(8, 8), (4, 8)}  # two latent sizes
    assert m["export"]["fp16_skipped"] == {} and m["export"]["tokenizer"]["strings_checked"] > len(TOKENIZER_PROBES)


def test_graphs_are_dynamic_and_equal_torch_on_new_inputs(sd_bundle, reference):
    bundle = load_bundle(sd_bundle)
    g = torch.Generator().manual_seed(7)
    text = onnx.load(str(bundle.graph_path("fp32", "text_encoder")))
    assert dims(text.graph.input[0]) == ["batch", "seq"]
    unet = onnx.load(str(bundle.graph_path("fp32", "unet")))
    assert [dims(i) for i in unet.graph.input] == [["batch", 4, "height", "width"], ["batch"], ["batch", "seq", 32]]

    ids = reference.tokenizer(
        ["a horse", "an oil painting of mountains at sunset", "CAFÉ 🙂"], padding="max_length", truncation=True
    ).input_ids
    ids = torch.tensor(ids)
    with torch.no_grad():
        want = reference.text_encoder(ids)[0].numpy()
    for precision, tol in (("fp32", FP32_TOL), ("fp16", FP16_TOL)):
        got = ort_run(bundle.graph_path(precision, "text_encoder"), {"input_ids": ids.numpy()})
        assert got.dtype == np.float32 and relative_error(got, want) <= tol, precision

    x = torch.randn(3, 4, 6, 10, generator=g)  # a latent size and batch validation did not use
    t = torch.tensor([0.0, 417.5, 999.0])
    ehs = torch.from_numpy(want)
    with torch.no_grad():
        want = reference.unet(x, t, ehs).sample.numpy()
    feeds = {"sample": x.numpy(), "timestep": t.numpy(), "encoder_hidden_states": ehs.numpy()}
    for precision, tol in (("fp32", FP32_TOL), ("fp16", FP16_TOL)):
        assert relative_error(ort_run(bundle.graph_path(precision, "unet"), feeds), want) <= tol, precision

    z = torch.randn(3, 4, 5, 7, generator=g) / reference.vae.config.scaling_factor
    with torch.no_grad():
        want = reference.vae.decode(z).sample.numpy()
    for precision, tol in (("fp32", FP32_TOL), ("fp16", FP16_TOL)):
        got = ort_run(bundle.graph_path(precision, "vae_decoder"), {"latent_sample": z.numpy()})
        assert got.shape == (3, 3, 10, 14) and relative_error(got, want) <= tol, precision


def _strings(n, seed=0):
    """Random strings over letters, digits, punctuation, whitespace, accents, CJK and emoji; some over 77 tokens."""
    pool = (
        list("abcxyzABCXYZ0123456789 .,!?'-_\t\n") + list("éüßøñ日本語中文한국어🙂🚀") + ["  ", "<|endoftext|>", "'s"]
    )
    rng = random.Random(seed)
    return ["".join(rng.choice(pool) for _ in range(rng.choice([0, 1, 5, 20, 60, 400]))) for _ in range(n)]


def test_tokenizer_json_tokenizes_as_transformers(sd_bundle, reference):
    """tokenizer.json through the tokenizers library, padded and truncated as the manifest says, gives the
    input_ids diffusers' tokenizer gives (CLIP's NFC, whitespace and lower-casing included)."""
    info = load_bundle(sd_bundle).model
    ours = PromptTokenizer(sd_bundle / info.tokenizer_file, info.model_max_length, info.pad_token, info.pad_token_id)
    texts = list(TOKENIZER_PROBES) + _strings(300) + ["word " * 200, "Ａ\u0301 ﬀ ① ²"]
    want = reference.tokenizer(texts, padding="max_length", max_length=77, truncation=True).input_ids
    got = ours(texts)
    assert got.shape == (len(texts), 77)
    assert [row.tolist() for row in got] == want
    pieces = reference.tokenizer.tokenize("astronaut riding quickly")
    assert len(pieces) > 3  # the vocabulary written on the spot splits words into several BPE pieces


def test_fp16_graphs_keep_sensitive_ops_in_fp32(sd_bundle):
    bundle = load_bundle(sd_bundle)
    f16 = onnx.TensorProto.FLOAT16
    for component, sensitive in (
        ("text_encoder", {"LayerNormalization", "Softmax"}),
        ("vae_decoder", {"GroupNormalization", "InstanceNormalization", "Softmax", "Resize"}),
        ("unet", {"GroupNormalization", "LayerNormalization", "Softmax", "Resize", "Sin", "Cos"}),
    ):
        model = onnx.load(str(bundle.graph_path("fp16", component)))
        inferred = onnx.shape_inference.infer_shapes(model)
        types = {
            v.name: v.type.tensor_type.elem_type
            for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)
        }
        types.update({init.name: init.data_type for init in model.graph.initializer})
        assert any(types.get(i) == f16 for n in model.graph.node if n.op_type in ("Conv", "MatMul") for i in n.input)
        found = [n for n in model.graph.node if n.op_type in sensitive]
        assert found, component
        for node in found:
            assert all(types.get(i) != f16 for i in node.input if i), (component, node.op_type, node.name)
        assert all(types[v.name] == onnx.TensorProto.FLOAT for v in model.graph.output)


def test_a_vae_decoder_that_overflows_fp16_is_left_out_and_said_why(sd_folder, tmp_path):
    """Activations above 65504 (here: the decoder's first convolution scaled up; SD's VAE at large sizes) give
    inf/NaN in fp16 where torch's float32 output is finite: validation detects it, the fp16 graph is deleted, the
    fp32 one kept, the reason returned for the manifest and logged."""
    src = load_text_to_image_source(sd_folder)
    with torch.no_grad():
        src.vae_decoder.vae.decoder.conv_in.weight.mul_(3e4)
    component = next(c for c in _components(src, [1, 2]) if c.name == "vae_decoder")
    lines = []
    entry, report, _, _, why = _export_component(
        component, tmp_path, opset=18, fp16=True, optimize=True, external_data_threshold=1 << 40, log=lines.append
    )
    assert entry["files"] == {"fp32": "vae_decoder.onnx"} and list(report) == ["fp32"]
    assert report["fp32"]["max_error"] <= FP32_TOL
    assert "non-finite" in why and "overflows fp16" in why and "left out" in why
    assert any(why in line for line in lines)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vae_decoder.onnx"]


# -- refusals -----------------------------------------------------------------------------------------------------
def _pipeline_folder(tmp_path, class_name, **components):
    folder = tmp_path / class_name
    folder.mkdir()
    index = {"_class_name": class_name, "_diffusers_version": "0.42.1", **components}
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


@pytest.mark.parametrize(
    "class_name, components, words",
    [
        ("StableDiffusionXLPipeline", {"unet": ["diffusers", "UNet2DConditionModel"]}, "SDXL: two text encoders"),
        ("StableDiffusion3Pipeline", {"transformer": ["diffusers", "SD3Transformer2DModel"]}, "SD3: an MMDiT"),
        ("StableDiffusionImg2ImgPipeline", {"unet": ["diffusers", "UNet2DConditionModel"]}, "image-to-image"),
        ("FluxPipeline", {"transformer": ["diffusers", "FluxTransformer2DModel"]}, "'FluxPipeline'"),
    ],
)
def test_other_pipeline_classes_are_refused_by_name(tmp_path, capsys, class_name, components, words):
    folder = _pipeline_folder(tmp_path, class_name, **components)
    for load in (diffusers_pipeline_kind, load_diffusers_source, load_text_to_image_source):
        with pytest.raises(ExportError, match=f"names the pipeline class '{class_name}'") as e:
            load(folder)
        assert words in str(e.value) and "StableDiffusionPipeline" in str(e.value)
    assert main(["export", "--from-diffusers", str(folder), "--out", str(tmp_path / "b")]) == 1
    assert class_name in capsys.readouterr().err and not (tmp_path / "b").exists()


def test_a_stable_diffusion_folder_is_not_a_pixel_source_and_vice_versa(sd_folder, diffusers_pipeline_dir):
    assert diffusers_pipeline_kind(sd_folder) == "text-to-image"
    assert diffusers_pipeline_kind(diffusers_pipeline_dir) == "unet"
    with pytest.raises(ExportError, match="text-to-image source: export it with deploy_diff.export.export_text_to_i"):
        load_diffusers_source(sd_folder)
    with pytest.raises(ExportError, match="is not a StableDiffusionPipeline folder"):
        load_text_to_image_source(diffusers_pipeline_dir)


@pytest.fixture()
def folder_copy(sd_folder, tmp_path):
    copy = tmp_path / "pipe"
    shutil.copytree(sd_folder, copy)
    return copy


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda d: _edit_json(d / "unet" / "config.json", time_cond_proj_dim=256), "time_cond_proj_dim=256 is not"),
        (lambda d: _edit_json(d / "unet" / "config.json", addition_embed_type="text_time"), "addition_embed_type"),
        (
            lambda d: _edit_json(d / "model_index.json", text_encoder=["transformers", "CLIPTextModelWithProjection"]),
            "needs CLIPTextModel",
        ),  # fmt: skip
        (lambda d: shutil.rmtree(d / "tokenizer"), "has no tokenizer/"),
        (
            lambda d: _edit_json(d / "scheduler" / "scheduler_config.json", _class_name="LMSDiscreteScheduler"),
            "'LMSDiscreteScheduler', which the runtime does not implement",
        ),  # fmt: skip
        (lambda d: _edit_json(d / "tokenizer" / "tokenizer_config.json", model_max_length=1000), "model_max_length"),
    ],
)
def test_components_the_graphs_cannot_take_are_refused(folder_copy, tmp_path, edit, words):
    edit(folder_copy)
    with pytest.raises(ExportError, match=words):
        export_text_to_image(folder_copy, tmp_path / "bundle", log=None)
    assert not (tmp_path / "bundle").exists()


def test_safety_checker_is_ignored(folder_copy):
    _edit_json(
        folder_copy / "model_index.json",
        safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"],
        feature_extractor=["transformers", "CLIPImageProcessor"],
    )
    src = load_text_to_image_source(folder_copy)  # no safety_checker/ folder: never read
    assert src.source["class"] == "StableDiffusionPipeline" and src.vae_scale_factor == 2


def test_cli_flags_that_do_not_apply_are_refused(sd_folder, tmp_path, capsys):
    out = tmp_path / "b"
    for flags in (["--static-batch", "2"], ["--tensorrt"], ["--scheduler-config", str(tmp_path / "s.json")]):
        assert main(["export", "--from-diffusers", str(sd_folder), "--out", str(out), *flags]) == 1
        err = capsys.readouterr().err
        assert "ExportError" in err and flags[0] in err and "does not apply to a StableDiffusionPipeline" in err
    assert not out.exists()


def test_bad_options_are_refused_before_any_work(sd_folder, tmp_path):
    occupied = tmp_path / "notes"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    for kwargs, words in (
        ({"opset": 16}, "opset must be an integer >= 17"),
        ({"validation_batches": []}, "validation_batches must be positive batch sizes; got \\[\\]"),
        ({"validation_batches": [1, 2.5]}, "validation_batches must be positive"),
    ):
        with pytest.raises(ExportError, match=words):
            export_text_to_image(sd_folder, tmp_path / "b", log=None, **kwargs)
    with pytest.raises(ExportError, match="is a folder that is not a bundle"):
        export_text_to_image(sd_folder, occupied, log=None)
    assert (occupied / "keep.txt").read_text() == "mine" and not (tmp_path / "b").exists()
