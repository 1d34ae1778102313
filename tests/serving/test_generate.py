"""``deploy-diff generate`` on a real local Ray instance (loopback, 2 CPUs, no dashboard): the shards equal a
single-process Pipeline run bit for bit whatever the number of workers, a worker killed with SIGKILL mid-run is
retried and every image is written exactly once, an interrupted driver (Ctrl-C) leaves a valid folder that a
rerun completes without recomputing what it holds, a torn or foreign shard is recomputed, and a rerun with
other settings is refused naming the setting."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time

import numpy as np
import pytest
from _generate_helpers import (
    cli,
    cli_command,
    manifest,
    one_by_one,
    own_generate_workers,
    read_all,
    reference,
    shard_hashes,
)
from _serving import terminal_signals

from deploy_diff.serving.generate import FORMAT, MANIFEST, generate, shard_name

STEPS = 4  # enough for the sampling loop to mix seeds and labels; the model is tiny


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray for the module (Ray starts in seconds, not milliseconds), always shut down."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    import ray

    from deploy_diff.serving._common import ray_init

    ray_init(num_cpus=2, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def done(ray_local, diffusers_bundle, tmp_path_factory):
    """A complete folder: 100 images in shards of 70 (a shard of two model calls, 64 + 6, then one of 30), one
    worker, DDIM."""
    out = tmp_path_factory.mktemp("gen") / "one"
    generate(diffusers_bundle, out, 100, shard_size=70, workers=1, scheduler="ddim", num_inference_steps=STEPS)
    return out


def test_shards_equal_a_single_process_run_with_one_or_two_workers(done, diffusers_bundle, tmp_path):
    m = manifest(done)
    assert m["format"] == FORMAT and m["complete"] is True and m["num_shards"] == 2
    assert m["settings"]["num_images"] == 100 and m["settings"]["shard_size"] == 70
    assert m["settings"]["scheduler"] == "ddim" and m["settings"]["num_inference_steps"] == STEPS
    assert [(e["file"], e["first_image"], e["num_images"]) for e in m["shards"]] == [
        (shard_name(0), 0, 70),
        (shard_name(1), 70, 30),
    ]
    got = read_all(done)
    assert set(got) == {"images", "seeds"}  # unconditional: no class_labels
    assert got["images"].dtype == np.uint8 and got["images"].shape == (100, 8, 8, 1)
    assert got["seeds"].dtype == np.int64 and got["seeds"].tolist() == list(range(100))
    ref = reference(diffusers_bundle, 100, 70, STEPS, scheduler="ddim")
    np.testing.assert_array_equal(got["images"], ref)
    single = one_by_one(diffusers_bundle, range(100), STEPS, scheduler="ddim")
    assert np.abs(got["images"].astype(int) - single).max() <= 1

    two = tmp_path / "two"
    assert (
        cli(
            [
                str(diffusers_bundle),
                "--num-images",
                "100",
                "--out",
                str(two),
                "--shard-size",
                "70",
                "--workers",
                "2",
                "--scheduler",
                "ddim",
                "--steps",
                str(STEPS),
                "--no-progress",
            ]
        )
        == 0
    )
    assert manifest(two)["runs"][-1]["workers"] == 2
    assert shard_hashes(two) == shard_hashes(done)  # bit-identical files, whatever the number of workers
    for i in range(2):
        assert (two / shard_name(i)).read_bytes() == (done / shard_name(i)).read_bytes()


def test_conditional_labels_balanced_and_listed(ray_local, cond_run_bundle, tmp_path):
    listed = tmp_path / "listed"
    generate(
        cond_run_bundle,
        listed,
        12,
        shard_size=5,
        workers=2,
        classes=[0, 3, 7],
        guidance_scale=2.0,
        seed_base=40,
        num_inference_steps=STEPS,
    )
    got = read_all(listed)
    labels = np.array([0, 3, 7] * 4, dtype=np.int64)
    assert got["class_labels"].dtype == np.int64 and got["class_labels"].tolist() == labels.tolist()
    assert got["seeds"].tolist() == list(range(40, 52))
    ref = reference(cond_run_bundle, 12, 5, STEPS, seed_base=40, labels=labels, guidance=2.0)
    np.testing.assert_array_equal(got["images"], ref)
    single = one_by_one(cond_run_bundle, range(40, 52), STEPS, labels=labels, guidance=2.0)
    assert np.abs(got["images"].astype(int) - single).max() <= 1
    assert manifest(listed)["settings"]["classes"] == [0, 3, 7]

    balanced = tmp_path / "balanced"  # the default for a conditional bundle
    generate(cond_run_bundle, balanced, 23, shard_size=23, workers=1, num_inference_steps=STEPS)
    got = read_all(balanced)
    assert got["class_labels"].tolist() == [i % 10 for i in range(23)]
    assert manifest(balanced)["settings"]["classes"] == "balanced"
    ref = reference(cond_run_bundle, 23, 23, STEPS, labels=np.arange(23) % 10)
    np.testing.assert_array_equal(got["images"], ref)


def test_a_worker_killed_mid_run_is_retried_and_every_image_is_written_once(ray_local, diffusers_bundle, tmp_path):
    out = tmp_path / "killed"
    n, shard, steps = 64, 8, 50  # 8 shards of one 8-image call each, about 0.3 s per call: a run of seconds
    result, errors = {}, []

    def drive():
        try:
            result["manifest"] = generate(
                diffusers_bundle, out, n, shard_size=shard, workers=2, num_inference_steps=steps, scheduler="ddim"
            )
        except BaseException as e:  # reported below, in the test's thread
            errors.append(e)

    driver = threading.Thread(target=drive, daemon=True)
    driver.start()
    victim, deadline = None, time.monotonic() + 60
    while victim is None and driver.is_alive() and time.monotonic() < deadline:
        landed = len(manifest(out)["shards"]) if (out / MANIFEST).is_file() else 0
        busy = own_generate_workers(busy_only=True)
        if landed >= 1 and busy:
            victim = busy[0]
            done_before = landed
            os.kill(victim, signal.SIGKILL)  # mid-chunk: its title says it is running one
        time.sleep(0.02)
    driver.join(timeout=90)
    assert not driver.is_alive(), "generate did not finish within 90 s after the kill"
    assert not errors, errors
    assert victim is not None, "no busy worker was seen while the run was going on"
    assert done_before < n // shard
    assert not os.path.exists(f"/proc/{victim}")  # really killed
    m = result["manifest"]
    assert m["complete"] and sorted(m["runs"][-1]["shards_computed"]) == list(range(8))
    assert sorted(os.listdir(out)) == sorted([MANIFEST] + [shard_name(i) for i in range(8)])  # no temp files
    got = read_all(out)
    assert got["seeds"].tolist() == list(range(n))  # every image exactly once, in order
    np.testing.assert_array_equal(got["images"], reference(diffusers_bundle, n, shard, steps, scheduler="ddim"))


def test_an_interrupted_driver_leaves_a_valid_folder_and_a_rerun_computes_only_the_rest(
    ray_local, diffusers_bundle, tmp_path
):
    """The driver runs as a separate process that joins this test's Ray with --address; Ctrl-C (SIGINT) stops it
    after its first shard lands; the same command then computes only the shards the folder lacks."""
    out = tmp_path / "interrupted"
    flags = [
        "--num-images",
        "96",
        "--out",
        str(out),
        "--shard-size",
        "8",
        "--workers",
        "2",
        "--steps",
        "50",
        "--scheduler",
        "ddim",
        "--no-progress",
    ]
    address = ray_local.get_runtime_context().gcs_address
    proc = subprocess.Popen(
        cli_command([str(diffusers_bundle), *flags, "--address", address]),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, RAY_USAGE_STATS_ENABLED="0"),
        preexec_fn=terminal_signals,
    )
    try:
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            if (out / MANIFEST).is_file() and manifest(out)["shards"]:
                proc.send_signal(signal.SIGINT)
                break
            time.sleep(0.02)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert proc.returncode == 130, err  # interrupted, not finished
    assert "interrupted" in err
    m = manifest(out)
    assert not m["complete"] and m["runs"][0]["address"] == address
    kept = sorted(e["index"] for e in m["shards"])
    assert 1 <= len(kept) < 12
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]  # only whole files
    stamps = {i: (out / shard_name(i)).stat().st_mtime_ns for i in kept}

    assert cli([str(diffusers_bundle), *flags]) == 0  # the same command, resumed
    m = manifest(out)
    run = m["runs"][-1]
    assert m["complete"] and run["shards_kept"] == kept
    assert sorted(run["shards_computed"]) == [i for i in range(12) if i not in kept]
    assert {i: (out / shard_name(i)).stat().st_mtime_ns for i in kept} == stamps  # not rewritten
    got = read_all(out)
    assert got["seeds"].tolist() == list(range(96))
    np.testing.assert_array_equal(got["images"], reference(diffusers_bundle, 96, 8, 50, scheduler="ddim"))


def test_torn_and_foreign_shards_are_recomputed_and_other_settings_refused(done, diffusers_bundle, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(done, out)
    original = {i: (done / shard_name(i)).read_bytes() for i in range(2)}
    flags = [
        "--num-images",
        "100",
        "--out",
        str(out),
        "--shard-size",
        "70",
        "--scheduler",
        "ddim",
        "--steps",
        str(STEPS),
        "--no-progress",
    ]

    # a rerun with other settings: refused, naming the setting (as a flag), the folder untouched
    before = (out / MANIFEST).read_bytes()
    for changed, words in [
        (["--steps", "5"], "was generated with --steps 4; this run has --steps 5"),
        (["--seed-base", "3"], "was generated with --seed-base 0; this run has --seed-base 3"),
        (["--shard-size", "50"], "was generated with --shard-size 70; this run has --shard-size 50"),
        (["--scheduler", "euler"], "was generated with --scheduler 'ddim'; this run has --scheduler 'euler'"),
        (["--threads", "2"], "was generated with --threads 1; this run has --threads 2"),
        (["--num-images", "101"], "was generated with --num-images 100; this run has --num-images 101"),
    ]:
        assert cli([str(diffusers_bundle), *flags, *changed]) == 1  # the last of a repeated flag wins
        err = capsys.readouterr().err
        assert f"GenerateError: {out} {words}: rerun with the same settings" in err, err
    other = tmp_path / "other-bundle"  # another bundle (its manifest differs): refused too
    shutil.copytree(diffusers_bundle, other)
    meta = json.loads((other / "deploy_diff.json").read_text())
    (other / "deploy_diff.json").write_text(json.dumps(dict(meta, note="another model")))
    assert cli([str(other), *flags]) == 1
    assert "was generated from another bundle" in capsys.readouterr().err
    assert (out / MANIFEST).read_bytes() == before

    # more workers than before is not a setting: a complete folder is simply complete (Ray is not even needed)
    assert cli([str(diffusers_bundle), *flags, "--workers", "2"]) == 0
    assert manifest(out)["runs"][-1]["shards_computed"] == []

    # shard 0 torn (cut short); shard 1 unlisted (a driver stopped between writing it and listing it) and
    # replaced by another file; a temp file of a cut-short write
    data = (out / shard_name(0)).read_bytes()
    (out / shard_name(0)).write_bytes(data[: len(data) // 2])
    m = manifest(out)
    m["shards"] = [e for e in m["shards"] if e["index"] != 1]
    (out / MANIFEST).write_text(json.dumps(m))
    np.savez(out / shard_name(1), images=np.zeros((30, 8, 8, 1), np.uint8), seeds=np.arange(30))
    (out / f".{shard_name(1)}.abc123.tmp").write_bytes(b"half")
    assert cli([str(diffusers_bundle), *flags]) == 0
    err = capsys.readouterr().err
    assert f"{out / shard_name(0)} does not match its sha256 in the manifest (torn or changed): computing it" in err
    assert f"{out / shard_name(1)} is not listed in {MANIFEST}" in err
    run = manifest(out)["runs"][-1]
    assert run["shards_kept"] == [] and sorted(run["shards_computed"]) == [0, 1]
    assert {i: (out / shard_name(i)).read_bytes() for i in range(2)} == original
    assert sorted(os.listdir(out)) == sorted([MANIFEST, shard_name(0), shard_name(1)])


def test_more_workers_than_the_cluster_has_cpus_are_refused(ray_local, diffusers_bundle, tmp_path, capsys):
    out = tmp_path / "o"
    argv = [str(diffusers_bundle), "--num-images", "4", "--out", str(out), "--steps", "2", "--no-progress"]
    assert cli([*argv, "--workers", "3"]) == 1
    assert "ValueError: --workers 3 with --threads 1 need 3 CPUs; the Ray cluster has 2" in capsys.readouterr().err
    assert manifest(out)["shards"] == [] and ray_local.is_initialized()  # the folder says what it will hold
    assert cli(argv) == 0  # the default: as many workers as the CPUs allow (here 2, but no more than chunks: 1)
    assert manifest(out)["complete"] and manifest(out)["runs"][-1]["workers"] == 1
