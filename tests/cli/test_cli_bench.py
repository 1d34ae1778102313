"""``deploy-diff bench``: timing per backend, precision and batch; each precision's images against its backend's
fp32 images; the diffusers baseline; the digits quality ratio; and refusals that name what was expected."""

import json
import math
import sys

import pytest

from deploy_diff.cli import main

FAST = ["--steps", "3", "--repeats", "1", "--threads", "1"]
ROW_KEYS = {"backend", "precision", "batch", "threads", "seconds_per_image", "max_abs", "mean_abs", "psnr_db"}


def _strict_json(path):
    """The file as JSON that any parser reads: no Infinity or NaN."""
    return json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))


def _bf16_cpu() -> bool:
    ov = pytest.importorskip("openvino")
    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def _table(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.split(" ", 1)[0] in ("backend", "onnxruntime", "openvino")]


@pytest.fixture(scope="module")
def rgb_bundle(tmp_path_factory):
    """A 3-channel bundle: the digits measure must refuse it."""
    from diffusers import UNet2DModel

    from deploy_diff.export import export_bundle, load_diffusers_source

    folder = tmp_path_factory.mktemp("rgb")
    UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8,),
        layers_per_block=1,
        down_block_types=("DownBlock2D",),
        up_block_types=("UpBlock2D",),
        norm_num_groups=4,
    ).save_pretrained(folder / "unet")
    export_bundle(load_diffusers_source(folder / "unet"), folder / "bundle", validation_batches=(1,), log=None)
    return folder / "bundle"


def test_cli_bench_against_diffusers(diffusers_bundle, tmp_path, capsys):
    args = ["bench", str(diffusers_bundle), *FAST, "--batch", "1,2", "--json", str(tmp_path / "b.json")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "speedup" in out
    result = _strict_json(tmp_path / "b.json")
    assert {"bundle", "scheduler", "steps", "rows", "quality", "cold_start"} <= set(result)
    rows = result["rows"]
    assert [r["batch"] for r in rows] == [1, 2]
    assert all(ROW_KEYS <= set(r) and r["backend"] == "onnxruntime" and r["precision"] == "fp32" for r in rows)
    assert all(r["max_abs_diff"] < 1e-4 and r["speedup"] > 0 for r in rows)
    assert all(r["seconds_per_image"] == pytest.approx(r["ours_s"] / r["batch"]) for r in rows)
    assert result["quality"] == [] and result["cold_start"] is None


def test_cli_bench_without_a_baseline(cond_run_bundle, capsys):
    assert main(["bench", str(cond_run_bundle), "--steps", "2", "--batch", "2", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "no diffusers baseline" in out and "per step ms" in out


def test_cli_bench_openvino_bf16_against_fp32_with_digits_quality(cond_run_bundle, tmp_path, capsys):
    if not _bf16_cpu():
        pytest.skip("this CPU has no bf16 (OpenVINO's OPTIMIZATION_CAPABILITIES lacks BF16)")
    args = [
        *("bench", str(cond_run_bundle), *FAST, "--batch", "1,2", "--no-baseline"),
        *("--backend", "onnxruntime,openvino", "--precision", "fp32,bf16"),
        *("--quality", "digits", "--quality-images", "32", "--json", str(tmp_path / "b.json")),
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    result = _strict_json(tmp_path / "b.json")
    rows = result["rows"]
    runs = [("onnxruntime", "fp32"), ("openvino", "fp32"), ("openvino", "bf16")]
    assert [(r["backend"], r["precision"], r["batch"]) for r in rows] == [(*r, b) for r in runs for b in (1, 2)]
    # onnxruntime has no bf16: that pair is left out (with the library's reason), the others still run
    assert [(s["backend"], s["precision"]) for s in result["skipped"]] == [("onnxruntime", "bf16")]
    assert "bf16" in result["skipped"][0]["reason"] and "skipped onnxruntime bf16" in out
    for r in rows:
        assert ROW_KEYS <= set(r) and r["threads"] == 1 and r["seconds_per_image"] > 0
        if r["precision"] == "fp32":
            assert r["max_abs"] == 0 and r["mean_abs"] == 0 and r["psnr_db"] is None
        else:  # bf16 rounds every forward: different images, but close to fp32's
            assert r["runner_precision"] == "bf16"
            assert 0 < r["max_abs"] < 0.1 and 0 < r["mean_abs"] < r["max_abs"] and math.isfinite(r["psnr_db"])
    quality = result["quality"]
    assert [(q["backend"], q["precision"]) for q in quality] == runs
    for q in quality:
        assert {"backend", "precision", "threads", "fd_ratio", "fd", "floor", "class_agreement"} <= set(q)
        assert math.isfinite(q["fd_ratio"]) and q["fd_ratio"] > 0 and q["num_images"] == 32
        assert q["fd_ratio"] == pytest.approx(q["fd"] / q["floor"])
    # the same seeds on openvino fp32 and onnxruntime fp32 (equal to ~1e-6 per forward): the same quality
    assert quality[0]["fd_ratio"] == pytest.approx(quality[1]["fd_ratio"], rel=1e-2)
    table = _table(out)
    assert len(table) == 1 + len(rows) and len({len(line) for line in table}) == 1  # one aligned row each
    assert sum("quality (digits, 32 images)" in line for line in out.splitlines()) == 3


def test_cli_bench_precisions_without_fp32_share_one_diffusers_baseline(diffusers_bundle, tmp_path, capsys):
    """fp32 not asked for: each backend's fp32 images are still made once per batch to compare with; the diffusers
    timing is measured once per batch and shared by every row."""
    precisions = "fp16,bf16" if _bf16_cpu() else "fp16"
    args = [
        *("bench", str(diffusers_bundle), *FAST, "--batch", "1,2", "--backend", "onnxruntime,openvino"),
        *("--precision", precisions, "--json", str(tmp_path / "b.json")),
    ]
    assert main(args) == 0
    rows = _strict_json(tmp_path / "b.json")["rows"]
    expected = [("onnxruntime", "fp16")] + ([("openvino", "bf16")] if "bf16" in precisions else [])
    assert [(r["backend"], r["precision"], r["batch"]) for r in rows] == [(*e, b) for e in expected for b in (1, 2)]
    for r in rows:
        assert 0 < r["max_abs"] < 0.1 and math.isfinite(r["psnr_db"])
        assert r["speedup"] > 0 and r["max_abs_diff"] < 0.1
    for batch in (1, 2):
        assert len({r["diffusers_s"] for r in rows if r["batch"] == batch}) == 1
    assert "max|diff|" in capsys.readouterr().out


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--backend", "onnxruntime,onnx"], ["--backend", "'onnx'", "openvino"]),
        (["--precision", "fp32,int8"], ["--precision", "'int8'", "bf16"]),
        (["--backend", "openvino", "--precision", "fp16"], ["openvino", "fp16"]),
        (["--quality", "fid"], ["--quality", "'fid'", "digits"]),
        (["--quality", "digits", "--quality-images", "1"], ["--quality-images", ">= 2"]),
    ],
)
def test_cli_bench_refusals_are_one_line(cond_run_bundle, capsys, flags, words):
    pytest.importorskip("openvino")
    assert main(["bench", str(cond_run_bundle), *FAST, *flags]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""  # refused before any timing
    assert captured.err.count("\n") == 1 and all(w in captured.err for w in words), captured.err


def test_cli_bench_digits_quality_refuses_a_3_channel_bundle(rgb_bundle, capsys):
    assert main(["bench", str(rgb_bundle), *FAST, "--no-baseline", "--quality", "digits"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert "1-channel" in captured.err and "3-channel" in captured.err


def test_cli_bench_cold_start_runs_the_asked_backend_and_precision(cond_run_bundle, tmp_path, capsys):
    if not _bf16_cpu():
        pytest.skip("this CPU has no bf16 (OpenVINO's OPTIMIZATION_CAPABILITIES lacks BF16)")
    args = ["bench", str(cond_run_bundle), *FAST, "--batch", "1", "--backend", "openvino", "--precision", "bf16"]
    assert main([*args, "--no-baseline", "--cold-start", "--json", str(tmp_path / "b.json")]) == 0
    [cs] = _strict_json(tmp_path / "b.json")["cold_start"]
    assert (cs["backend"], cs["precision"], cs["threads"]) == ("openvino", "bf16", 1)
    ours = cs["ours"]
    assert (ours["runner"], ours["runner_precision"]) == ("OpenVINORunner", "bf16")  # a fresh process, bf16 too
    assert ours["seconds"] > 0 and ours["peak_rss_bytes"] > 0 and not ours["torch_imported"]
    assert "cold start (import + load + 1 step): openvino bf16" in capsys.readouterr().out


def test_cli_bench_digits_quality_without_scikit_learn_says_what_to_install(cond_run_bundle, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # as if scikit-learn were not installed
    assert main(["bench", str(cond_run_bundle), *FAST, "--no-baseline", "--quality", "digits"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert "ImportError" in captured.err and "pip install 'deploy-diff[train]'" in captured.err
