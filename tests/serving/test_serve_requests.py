"""The HTTP API's request rules without Ray: every refusal's status, field and message, seeds, defaults, PNGs, the
server's options, and the bundle kinds serving accepts."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from _serving import decode_png

from deploy_diff.runtime.bundle import BundleError, load_bundle
from deploy_diff.serving._common import pipeline_kind, require_pixel_bundle
from deploy_diff.serving.requests import (
    FIELDS,
    MAX_BODY_BYTES,
    Limits,
    RequestError,
    RequestParser,
    error_body,
    png_base64,
    scheduler_short_name,
)


@pytest.fixture(scope="module")
def cond(cond_run_bundle):
    """Class-conditional (10 classes, null label 10), DDPM."""
    b = load_bundle(cond_run_bundle)
    return RequestParser(b.model, b.scheduler_config(), Limits(max_images=8, max_steps=100))


@pytest.fixture(scope="module")
def uncond(diffusers_bundle):
    b = load_bundle(diffusers_bundle)
    return RequestParser(b.model, b.scheduler_config(), Limits(max_images=8, max_steps=100))


def refused(parser: RequestParser, body) -> RequestError:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with pytest.raises(RequestError) as info:
        parser.parse(raw)
    e = info.value
    assert e.body() == {"error": {"field": e.field, "message": e.message}}
    assert e.message
    return e


def test_defaults_are_the_documented_body(cond):
    r = cond.parse(b"{}")
    assert r.seeds == (0,) and r.num_inference_steps == 50 and r.scheduler is None
    assert r.guidance_scale is None and r.eta == 0.0
    assert r.class_labels == (10,)  # no label: the null label, what pipe(class_labels=None) samples with
    assert cond.parse(json.dumps(FIELDS).encode()) == r  # the body the API documents, spelled out


def test_a_distilled_bundles_own_step_count_is_the_default_and_its_maximum_holds(cond_run_bundle):
    """A few-step bundle (manifest default_inference_steps / max_inference_steps) is served with its own default,
    and more than its sampler's maximum is a 422 naming it, unless another scheduler is asked for."""
    b = load_bundle(cond_run_bundle)
    model = dataclasses.replace(b.model, default_inference_steps=4, max_inference_steps=40)
    parser = RequestParser(model, b.scheduler_config(), Limits(max_images=8, max_steps=100))
    assert parser.parse(b"{}").num_inference_steps == 4
    assert parser.parse(b'{"num_inference_steps": 40}').num_inference_steps == 40
    e = refused(parser, {"num_inference_steps": 41})
    assert e.status == 422 and e.field == "num_inference_steps" and "max_inference_steps=40" in e.message
    assert parser.parse(b'{"num_inference_steps": 41, "scheduler": "ddim"}').num_inference_steps == 41


def test_seeds_are_per_image(cond):
    r = cond.parse(json.dumps({"num_images": 3, "seed": 7, "class_labels": [1, 2, 3]}).encode())
    assert r.seeds == (7, 8, 9) and r.class_labels == (1, 2, 3)
    r = cond.parse(json.dumps({"seeds": [5, 1, 5], "class_labels": 4}).encode())
    assert r.num_images == 3 and r.seeds == (5, 1, 5) and r.class_labels == (4, 4, 4)
    r = cond.parse(json.dumps({"num_images": 2, "seeds": [3, 4], "seed": None}).encode())
    assert r.seeds == (3, 4)
    r = cond.parse(json.dumps({"num_images": 4, "seed": None}).encode())  # a random first seed, consecutive
    assert np.diff(r.seeds).tolist() == [1, 1, 1] and 0 <= r.seeds[0] < 2**32
    r = cond.parse(json.dumps({"seed": 2**64 - 2, "num_images": 2}).encode())
    assert r.seeds == (2**64 - 2, 2**64 - 1)


def test_settings_group_what_can_share_a_batch(cond):
    a = cond.parse(json.dumps({"seed": 1, "scheduler": "DDIM", "eta": 0.5, "num_inference_steps": 10}).encode())
    b = cond.parse(json.dumps({"seed": 2, "scheduler": "ddim", "eta": 0.5, "num_inference_steps": 10}).encode())
    assert a.scheduler == "ddim" and a.settings == b.settings == (10, "ddim", None, 0.5)
    c = cond.parse(json.dumps({"seed": 1, "guidance_scale": 2, "num_inference_steps": 10}).encode())
    assert c.settings == (10, None, 2.0, 0.0) and c.settings != a.settings


@pytest.mark.parametrize(
    "body, status, field, words",
    [
        (b"not json", 400, None, "not JSON"),
        (b"", 400, None, "not JSON"),
        (b"\xff\xfe{}", 400, None, "not JSON"),
        (b'{"eta": NaN}', 400, None, "not JSON"),
        (b"[1, 2]", 400, None, "JSON object"),
        (b'"text"', 400, None, "JSON object"),
        ({"num_images": 9}, 413, "num_images", "limit of 8"),
        ({"seeds": list(range(9))}, 413, "seeds", "limit of 8"),
        ({"num_inference_steps": 101}, 413, "num_inference_steps", "limit of 100"),
        ({"steps": 10}, 422, "steps", "unknown field 'steps'"),
        ({"num_images": 0}, 422, "num_images", "positive int"),
        ({"num_images": 2.0}, 422, "num_images", "positive int"),
        ({"num_images": "2"}, 422, "num_images", "positive int"),
        ({"num_images": True}, 422, "num_images", "positive int"),
        ({"num_images": None}, 422, "num_images", "positive int"),
        ({"seed": -1}, 422, "seed", "[0, 2**64)"),
        ({"seed": 1.5}, 422, "seed", "must be an int"),
        ({"seed": [1, 2]}, 422, "seed", "must be an int"),
        ({"seed": 2**64 - 1, "num_images": 2}, 422, "seed", "past the last seed"),
        ({"seed": 1, "seeds": [1]}, 422, "seeds", "not both"),
        ({"seeds": []}, 422, "seeds", "non-empty list"),
        ({"seeds": 3}, 422, "seeds", "non-empty list"),
        ({"seeds": [1, "2"]}, 422, "seeds", "must be an int"),
        ({"seeds": [1, 2], "num_images": 3}, 422, "seeds", "got 2 seeds for num_images=3"),
        ({"num_inference_steps": 0}, 422, "num_inference_steps", "outside [1, num_train_timesteps=1000]"),
        ({"num_inference_steps": "50"}, 422, "num_inference_steps", "positive int"),
        ({"scheduler": "plms"}, 422, "scheduler", "one of"),
        ({"scheduler": 3}, 422, "scheduler", "one of"),
        ({"guidance_scale": -1}, 422, "guidance_scale", ">= 0"),
        ({"guidance_scale": "high"}, 422, "guidance_scale", ">= 0"),
        ({"class_labels": 10.5}, 422, "class_labels", "integers"),
        ({"class_labels": 11}, 422, "class_labels", "0..9"),
        ({"class_labels": [1, 2], "num_images": 3}, 422, "class_labels", "num_images=3"),
        ({"class_labels": "seven"}, 422, "class_labels", "integers"),
        ({"eta": -0.1}, 422, "eta", ">= 0"),
        ({"eta": 0.5}, 422, "eta", "only used by DDIM"),
    ],
)
def test_refusals_name_status_and_field(cond, body, status, field, words):
    e = refused(cond, body)
    assert (e.status, e.field) == (status, field), e.message
    assert words in e.message


def test_steps_past_the_schedule_are_out_of_range(cond_run_bundle):
    b = load_bundle(cond_run_bundle)
    wide = RequestParser(b.model, b.scheduler_config(), Limits(max_steps=5000))
    e = refused(wide, {"num_inference_steps": 1001})
    assert (e.status, e.field) == (422, "num_inference_steps") and "num_train_timesteps=1000" in e.message


def test_body_size_limit(cond):
    ok = json.dumps({"seed": 1, "class_labels": 3}).encode().ljust(MAX_BODY_BYTES)  # JSON allows the spaces
    assert cond.parse(ok).seeds == (1,)
    e = refused(cond, ok + b" ")
    assert (e.status, e.field) == (413, None) and f"{MAX_BODY_BYTES:,}" in e.message


def test_model_rules_of_an_unconditional_bundle(uncond):
    assert uncond.parse(b'{"num_images": 2}').class_labels is None
    e = refused(uncond, {"guidance_scale": 2.0})
    assert (e.status, e.field) == (422, "guidance_scale") and "unconditional" in e.message
    e = refused(uncond, {"class_labels": 1})
    assert (e.status, e.field) == (422, "class_labels") and "unconditional" in e.message


def test_class_labels_missing_where_the_model_has_no_null_label(cond_run_bundle):
    b = load_bundle(cond_run_bundle)
    no_null = dataclasses.replace(b.model, null_class_label=None)  # a class-conditional model without label dropout
    parser = RequestParser(no_null, b.scheduler_config())
    e = refused(parser, {"num_images": 2})
    assert (e.status, e.field) == (422, "class_labels") and "no null label" in e.message
    e = refused(parser, {"class_labels": 1, "guidance_scale": 3})
    assert (e.status, e.field) == (422, "guidance_scale") and "null class label" in e.message
    assert parser.parse(b'{"class_labels": [1, 2], "num_images": 2}').class_labels == (1, 2)


def test_request_error_survives_pickling():
    import pickle

    e = pickle.loads(pickle.dumps(RequestError(413, "num_images", "too many")))
    assert (e.status, e.field, e.message) == (413, "num_images", "too many")
    assert error_body(None, "m") == {"error": {"field": None, "message": "m"}}


def test_png_round_trip():
    rng = np.random.default_rng(0)
    for shape in [(8, 8, 1), (5, 7, 3)]:
        im = rng.integers(0, 256, shape, dtype=np.uint8)
        assert np.array_equal(decode_png(png_base64(im)), im)
    with pytest.raises(ValueError, match="uint8"):
        png_base64(np.zeros((8, 8, 1), np.float32))


def test_scheduler_short_names():
    assert scheduler_short_name({"_class_name": "DDPMScheduler"}) == "ddpm"
    assert scheduler_short_name({"_class_name": "DPMSolverMultistepScheduler"}) == "dpmsolver++"
    dpm = {"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "sde-dpmsolver++"}
    assert scheduler_short_name(dpm) == "sde-dpmsolver++"
    assert scheduler_short_name({"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "dpmsolver"}) == (
        "DPMSolverMultistepScheduler"
    )


@pytest.mark.parametrize("bad", [{"max_images": 0}, {"max_steps": 1.5}, {"max_body_bytes": None}])
def test_limits_are_checked(bad):
    name = next(iter(bad))
    with pytest.raises(ValueError, match=f"{name} must be a positive int"):
        Limits(**bad)


def test_serve_options_are_checked():
    pytest.importorskip("ray.serve")
    from deploy_diff.serving.app import ServeOptions

    assert ServeOptions().max_ongoing_requests >= ServeOptions().max_batch_size
    for bad, words in [
        ({"replicas": 0}, "replicas must be a positive int"),
        ({"max_batch_size": 0}, "max_batch_size must be a positive int"),
        ({"batch_wait_ms": -1}, "batch_wait_ms must be a number"),
        ({"request_timeout_s": 0}, "request_timeout_s must be a finite number > 0"),
        ({"request_timeout_s": float("inf")}, "request_timeout_s must be a finite number > 0"),
    ]:
        with pytest.raises(ValueError, match=words):
            ServeOptions(**bad)


def test_only_pixel_unet_bundles(cond_run_bundle, tmp_path):
    assert require_pixel_bundle(cond_run_bundle).path == cond_run_bundle
    assert pipeline_kind({}) == "unet" and pipeline_kind({"pipeline": None}) == "unet"
    other = tmp_path / "t2i"
    shutil.copytree(cond_run_bundle, other)
    manifest_path = other / "deploy_diff.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["pipeline"] = "text2img"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="has pipeline 'text2img'; expected one of"):  # unknown: load_bundle refuses
        require_pixel_bundle(other)


def test_importing_serving_does_not_import_ray():
    code = (
        "import sys; import deploy_diff.serving, deploy_diff.serving._common, deploy_diff.serving.requests, "
        "deploy_diff.cli.serve; assert 'ray' not in sys.modules, 'ray imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
