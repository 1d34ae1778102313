"""Export: diffusers UNet2DModels and our UNet to validated ONNX bundles; the manifest; bad input."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import deploy_diff.export.bundle as export_module
from deploy_diff.cli import main
from deploy_diff.export import ExportError, ValidationError, export_bundle, load_diffusers_source, load_run_source
from deploy_diff.export.validate import TOLERANCES
from deploy_diff.runtime._numeric import relative_error
from deploy_diff.runtime.bundle import BundleError, load_bundle, sha256_file

FP32_TOL = TOLERANCES["fp32"]  # relative_error: max|onnx - torch| / max(1, max|torch|)
FP16_TOL = TOLERANCES["fp16"]


def ort_run(graph: Path, feeds: dict) -> np.ndarray:
    sess = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    return sess.run(None, {k: v for k, v in feeds.items() if k in names})[0]


def fresh_inputs(batch, channels=1, size=8, labels=None, seed=123):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, size, size, generator=g)
    t = torch.from_numpy((np.linspace(0, 999, batch) + 0.37 * (np.arange(batch) % 2 == 1)).astype(np.float32))
    feeds = {"sample": x.numpy(), "timestep": t.numpy().astype(np.float32)}
    if labels is not None:
        feeds["class_labels"] = np.asarray(labels, dtype=np.int64)
    return x, t, feeds


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name)


def after_graphs_written(monkeypatch, action):
    """Make ``action(staging_folder)`` run when export has written the graphs, before it validates them."""
    write_graphs = export_module.write_graphs

    def write_then_act(src, folder, **kwargs):
        written = write_graphs(src, folder, **kwargs)
        action(folder)
        return written

    monkeypatch.setattr(export_module, "write_graphs", write_then_act)


# -- diffusers UNet2DModel ------------------------------------------------------------------------------------
def test_diffusers_pipeline_with_attention_exports_and_matches(diffusers_pipeline_dir, diffusers_bundle):
    from diffusers import UNet2DModel

    bundle = load_bundle(diffusers_bundle)
    m = bundle.manifest
    assert m["model"]["num_classes"] == 0 and m["model"]["null_class_label"] is None
    assert list(m["model"]["inputs"]) == ["sample", "timestep"] and list(m["model"]["outputs"]) == ["out"]
    assert m["export"]["opset"] >= 17 and m["model"]["source"]["kind"] == "diffusers"
    assert m["export"]["validation"]["fp32"]["max_error"] <= FP32_TOL
    assert m["export"]["validation"]["fp16"]["max_error"] <= FP16_TOL
    unet = UNet2DModel.from_pretrained(diffusers_pipeline_dir / "unet").eval()
    for batch in (1, 4):  # inputs the export never saw
        x, t, feeds = fresh_inputs(batch)
        with torch.no_grad():
            ref = unet(x, t).sample.numpy()
        assert relative_error(ort_run(bundle.graph_path("fp32"), feeds), ref) <= FP32_TOL
        out16 = ort_run(bundle.graph_path("fp16"), feeds)
        assert out16.dtype == np.float32  # fp16 graphs keep float32 inputs and output
        assert relative_error(out16, ref) <= FP16_TOL


def test_onnx_graph_is_valid_self_contained_and_dynamic(diffusers_bundle):
    bundle = load_bundle(diffusers_bundle)
    graph = bundle.graph_path("fp32")
    assert not graph.with_name("unet.onnx.data").exists()  # small models are one self-contained file
    model = onnx.load(str(graph))
    onnx.checker.check_model(model, full_check=True)
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert isinstance(dims[0], str) and dims[1:] == [1, 8, 8]
    assert model.graph.input[1].type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_fp16_graph_keeps_sensitive_ops_in_fp32(diffusers_bundle):
    model = onnx.load(str(load_bundle(diffusers_bundle).graph_path("fp16")))
    onnx.checker.check_model(model, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {
        vi.name: vi.type.tensor_type.elem_type
        for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)
    }
    types.update({init.name: init.data_type for init in model.graph.initializer})
    f16 = onnx.TensorProto.FLOAT16
    ops = {n.op_type for n in model.graph.node}
    assert "Resize" in ops and "Softmax" in ops
    assert any(types.get(i) == f16 for n in model.graph.node if n.op_type == "Conv" for i in n.input)
    for node in model.graph.node:
        if node.op_type in ("Resize", "Softmax", "InstanceNormalization", "Sin", "Cos"):
            assert all(types.get(i) != f16 for i in node.input if i), (node.op_type, node.name)


def test_conditional_bare_unet_folder_with_a_scheduler_config(diffusers_cond_unet_dir, tmp_path):
    from diffusers import DDIMScheduler, UNet2DModel

    sched_file = tmp_path / "sched" / "scheduler_config.json"
    DDIMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction").save_config(sched_file.parent)
    out = tmp_path / "bundle"
    assert (
        main(
            [
                "export",
                "--from-diffusers",
                str(diffusers_cond_unet_dir),
                "--scheduler-config",
                str(sched_file),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    bundle = load_bundle(out)
    model = bundle.manifest["model"]
    assert model["num_classes"] == 10 and model["null_class_label"] is None
    assert model["inputs"]["class_labels"]["dtype"] == "int64" and model["prediction_type"] == "v_prediction"
    assert bundle.scheduler_config()["_class_name"] == "DDIMScheduler"
    unet = UNet2DModel.from_pretrained(diffusers_cond_unet_dir).eval()
    labels = [0, 9, 4]
    x, t, feeds = fresh_inputs(3, labels=labels)
    with torch.no_grad():
        ref = unet(x, t, class_labels=torch.tensor(labels)).sample.numpy()
    assert relative_error(ort_run(bundle.graph_path(), feeds), ref) <= FP32_TOL


def test_bare_unet_folder_defaults_to_ddpm(diffusers_cond_unet_dir):
    src = load_diffusers_source(diffusers_cond_unet_dir)
    assert src.scheduler_config["_class_name"] == "DDPMScheduler"
    assert src.scheduler_config["num_train_timesteps"] == 1000 and src.conditional


# -- our UNet -------------------------------------------------------------------------------------------------
def test_our_conditional_unet_exports_and_matches(cond_run_dir, cond_run_bundle):
    from deploy_diff.train.checkpoint import find_checkpoint
    from deploy_diff.train.unet import UNet

    bundle = load_bundle(cond_run_bundle)
    m = bundle.manifest["model"]
    assert m["num_classes"] == 10 and m["null_class_label"] == 10
    assert m["source"]["kind"] == "deploy-diff" and m["source"]["weights"] == "ema"
    ckpt = find_checkpoint(cond_run_dir)
    unet = UNet(ckpt.model_config).eval()
    unet.load_state_dict(ckpt.ema_state)
    labels = [3, 10, 7, 0, 10]
    x, t, feeds = fresh_inputs(5, labels=labels)
    with torch.no_grad():
        ref = unet(x, t, torch.tensor(labels)).numpy()
    assert relative_error(ort_run(bundle.graph_path(), feeds), ref) <= FP32_TOL


def test_no_ema_exports_the_raw_weights(cond_run_dir):
    src = load_run_source(cond_run_dir, use_ema=False)
    assert src.source["weights"] == "model"


# -- the manifest and the scheduler config ---------------------------------------------------------------------
def test_manifest_hashes_verify_and_scheduler_config_loads_in_diffusers(diffusers_bundle):
    from diffusers import DDIMScheduler, DDPMScheduler

    from deploy_diff.runtime.schedulers import DDIMScheduler as OurDDIM
    from deploy_diff.runtime.schedulers import load_scheduler

    bundle = load_bundle(diffusers_bundle)
    files = bundle.manifest["files"]
    assert set(files) == {"unet.onnx", "unet.fp16.onnx", "scheduler_config.json"}
    for name, entry in files.items():
        assert entry["sha256"] == sha256_file(diffusers_bundle / name)
        assert entry["bytes"] == (diffusers_bundle / name).stat().st_size
    theirs = DDPMScheduler.from_pretrained(diffusers_bundle)
    ours = load_scheduler(bundle.scheduler_config())
    for n in (10, 50, 1000):
        theirs.set_timesteps(n)
        ours.set_timesteps(n)
        np.testing.assert_array_equal(theirs.timesteps.numpy(), ours.timesteps)
    theirs_ddim = DDIMScheduler.from_config(DDPMScheduler.load_config(diffusers_bundle))
    ours_ddim = OurDDIM.from_config(bundle.scheduler_config())
    theirs_ddim.set_timesteps(50)
    ours_ddim.set_timesteps(50)
    np.testing.assert_array_equal(theirs_ddim.timesteps.numpy(), ours_ddim.timesteps)


def test_inspect_prints_the_manifest(diffusers_bundle, capsys):
    assert main(["inspect", str(diffusers_bundle)]) == 0
    out = capsys.readouterr().out
    assert "files verified" in out and "unet.fp16.onnx" in out and "fp32: max error" in out
    assert "DDPMScheduler" in out and "unconditional" in out
    assert main(["inspect", str(diffusers_bundle), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["format"] == "deploy-diff/bundle"


def test_reexport_replaces_a_bundle_and_large_graphs_use_external_data(cond_run_dir, cond_run_bundle, tmp_path):
    out = tmp_path / "bundle"
    shutil.copytree(cond_run_bundle, out)
    before = load_bundle(out).manifest["export"]["created"]
    # a threshold of 1 kB stands in for protobuf's 2 GB limit
    export_bundle(load_run_source(cond_run_dir), out, external_data_threshold=1000, log=None)
    bundle = load_bundle(out)
    assert "unet.onnx.data" in bundle.manifest["files"] and (out / "unet.onnx.data").stat().st_size > 10_000
    assert (out / "unet.onnx").stat().st_size < (out / "unet.onnx.data").stat().st_size
    assert bundle.manifest["export"]["validation"]["fp32"]["max_error"] <= FP32_TOL
    assert bundle.manifest["export"]["created"] >= before
    assert leftovers(tmp_path) == []
    from deploy_diff.runtime import Pipeline

    images = Pipeline.from_bundle(out, scheduler="ddim")(num_images=2, num_inference_steps=3, seed=0)
    ref = Pipeline.from_bundle(cond_run_bundle, scheduler="ddim")(num_images=2, num_inference_steps=3, seed=0)
    np.testing.assert_allclose(images, ref, atol=1e-6)


# -- bad input: clear errors, nothing half-written ---------------------------------------------------------------
@pytest.fixture
def run_copy(cond_run_dir, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(cond_run_dir, dst, ignore=shutil.ignore_patterns("checkpoints", "samples"))
    return dst


def test_missing_weights_are_a_clear_error(run_copy, tmp_path):
    (run_copy / "ema.safetensors").unlink()
    with pytest.raises(ExportError, match="missing ema.safetensors"):
        export_bundle(load_run_source(run_copy), tmp_path / "out", log=None)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_corrupt_weights_are_a_clear_error(run_copy, tmp_path):
    p = run_copy / "model.safetensors"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(ExportError, match="sha256"):
        load_run_source(run_copy)


@pytest.mark.parametrize(
    "setup, match",
    [
        (lambda d: None, "neither a diffusers pipeline"),
        (lambda d: (d / "model_index.json").write_text("{not json"), "not valid JSON"),
        (
            lambda d: (d / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"})),
            "UNet2DModel .*only",
        ),
        (lambda d: (d / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"})), "holds no weights"),
    ],
)
def test_wrong_or_unsupported_diffusers_folders(tmp_path, setup, match):
    folder = tmp_path / "model"
    folder.mkdir()
    setup(folder)
    with pytest.raises(ExportError, match=match):
        load_diffusers_source(folder)


def test_a_run_folder_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err
    assert "ExportError" in err and "cannot export" in err
    assert main(["export", "--out", str(tmp_path / "b")]) == 1
    assert "exactly one source" in capsys.readouterr().err


def test_an_injected_mismatch_fails_validation_loudly(cond_run_dir, tmp_path, monkeypatch):
    def tamper(folder):  # change one weight of the written graph: ONNX no longer equals torch
        model = onnx.load(str(folder / "unet.onnx"))
        init = max(model.graph.initializer, key=lambda i: np.prod(i.dims))
        arr = onnx.numpy_helper.to_array(init).copy()
        arr.flat[: arr.size // 2] *= 1.5
        init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
        onnx.save(model, str(folder / "unet.onnx"))

    out = tmp_path / "bundle"
    after_graphs_written(monkeypatch, tamper)
    with pytest.raises(ValidationError, match="differs from the torch model"):
        export_bundle(load_run_source(cond_run_dir), out, log=None)
    assert not out.exists() and leftovers(tmp_path) == []


def test_an_interrupted_export_leaves_the_old_bundle_untouched(cond_run_dir, cond_run_bundle, tmp_path, monkeypatch):
    out = tmp_path / "bundle"
    shutil.copytree(cond_run_bundle, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def interrupt(folder):
        raise KeyboardInterrupt

    after_graphs_written(monkeypatch, interrupt)
    with pytest.raises(KeyboardInterrupt):
        export_bundle(load_run_source(cond_run_dir), out, log=None)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert leftovers(tmp_path) == []


def test_a_folder_that_is_not_a_bundle_is_never_overwritten(cond_run_dir, tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    with pytest.raises(ExportError, match="not a bundle"):
        export_bundle(load_run_source(cond_run_dir), out, log=None)
    assert (out / "thesis.tex").read_text() == "years of work" and len(os.listdir(out)) == 1


def test_bad_export_options(cond_run_dir, tmp_path):
    src = load_run_source(cond_run_dir)
    with pytest.raises(ExportError, match="static_batch"):
        export_bundle(src, tmp_path / "b", static_batch=0, log=None)
    with pytest.raises(ValueError, match="opset"):
        export_bundle(src, tmp_path / "b", opset=11, log=None)
    assert not (tmp_path / "b").exists() and leftovers(tmp_path) == []


def test_tensorrt_without_tensorrt_is_a_clear_error_before_any_work(cond_run_dir, tmp_path, monkeypatch):
    import sys

    from deploy_diff.export.tensorrt import TensorRTUnavailableError

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(TensorRTUnavailableError, match="TensorRT is not installed"):
        export_bundle(load_run_source(cond_run_dir), tmp_path / "b", tensorrt=True, log=None)
    assert not (tmp_path / "b").exists()


def test_a_bundle_that_was_changed_is_refused(diffusers_bundle, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(diffusers_bundle, b)
    with open(b / "unet.onnx", "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(BundleError, match="sha256"):
        load_bundle(b)


def test_a_fused_graph_that_fails_validation_falls_back_to_the_plain_graph(
    diffusers_pipeline_dir, tmp_path, monkeypatch
):
    calls = []

    def tamper(folder):  # break the fused attention only: the plain graph written afterwards must be used
        calls.append(1)
        model = onnx.load(str(folder / "unet.onnx"))
        for node in model.graph.node:
            if node.op_type == "MultiHeadAttention":
                for attr in node.attribute:
                    if attr.name == "scale":
                        attr.f *= 3.0
        onnx.save(model, str(folder / "unet.onnx"))

    out = tmp_path / "b"
    after_graphs_written(monkeypatch, tamper)
    manifest = export_bundle(load_diffusers_source(diffusers_pipeline_dir), out, log=None)
    opt = manifest["export"]["optimization"]
    assert calls and opt["attention_fused"] >= 1 and opt["kept"] is False and "differs" in opt["rejected"]
    ops = {n.op_type for n in onnx.load(str(out / "unet.onnx")).graph.node}
    assert "MultiHeadAttention" not in ops and "Softmax" in ops
    assert manifest["export"]["validation"]["fp32"]["max_error"] <= FP32_TOL
    load_bundle(out)


def test_the_fused_graph_is_kept_when_it_validates(diffusers_bundle):
    manifest = load_bundle(diffusers_bundle).manifest
    assert manifest["export"]["optimization"] == {"attention_fused": 4, "kept": True}  # down, up and mid-block
    ops = {n.op_type for n in onnx.load(str(diffusers_bundle / "unet.onnx")).graph.node}
    assert "MultiHeadAttention" in ops
