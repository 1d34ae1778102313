"""Reliability and security: bad input on every CLI command and at the runtime API gives one clear error,
no user file is ever unpickled, a bundle cannot make the runtime read outside its folder or allocate what its
manifest claims, and one Pipeline shared by many threads gives the serial images without growing memory.

Each test's docstring says what was tried, what the user sees, and what is kept (the README's table rows).
"""

import ast
import builtins
import gc
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import deploy_diff
from deploy_diff.cli import main
from deploy_diff.runtime import Pipeline
from deploy_diff.runtime.bundle import BundleError, load_bundle
from deploy_diff.runtime.rng import TorchGenerator
from deploy_diff.runtime.sampling import NonFiniteError
from deploy_diff.runtime.schedulers import SCHEDULER_CLASSES, SCHEDULER_NAMES

PACKAGE = Path(deploy_diff.__file__).resolve().parent


# -- helpers ----------------------------------------------------------------------------------------------------
def one_error_line(err: str, command: str) -> str:
    """The CLI's error contract: exactly one stderr line ``deploy-diff <command>: error: ...``, no traceback."""
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{err}"
    assert lines[0].startswith(f"deploy-diff {command}: error: "), err
    assert "Traceback" not in err
    return lines[0]


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deploy_diff.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


def copy_bundle(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_manifest(bundle: Path, edit) -> None:
    path = bundle / "deploy_diff.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


class CountingRunner:
    """Wraps a runner and counts model calls (a refused call must never reach the model)."""

    def __init__(self, runner):
        self.runner, self.calls = runner, 0

    def __call__(self, x, t, labels=None):
        self.calls += 1
        return self.runner(x, t, labels)


class Payload:
    """Unpickling this object opens (creates) ``marker`` for writing: a stand-in for arbitrary code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


# -- 1. CLI: every command, bad input -> one readable line, non-zero exit, no traceback ------------------------
@pytest.fixture
def paths(tmp_path, cond_run_bundle, diffusers_bundle, cond_run_dir):
    (tmp_path / "notes.txt").write_text("not a bundle, not JSON\n")
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "unknown_key.json").write_text('{"train": {"steps": 5}, "no_such_key": 1}')
    (tmp_path / "empty").mkdir()
    (tmp_path / "torn_bundle").mkdir()
    (tmp_path / "torn_bundle" / "deploy_diff.json").write_text("{")
    return {"cond": str(cond_run_bundle), "uncond": str(diffusers_bundle), "run": str(cond_run_dir),
            "missing": str(tmp_path / "does-not-exist"), "file": str(tmp_path / "notes.txt"),
            "folder": str(tmp_path / "empty"), "bad_json": str(tmp_path / "bad.json"),
            "list_json": str(tmp_path / "list.json"), "unknown_key_json": str(tmp_path / "unknown_key.json"),
            "torn_bundle": str(tmp_path / "torn_bundle"), "new": str(tmp_path / "new" / "out.png"),
            "new_dir": str(tmp_path / "new_dir")}


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
    (["sample", "{cond}", "--steps", "0", *_SAMPLE], "num_inference_steps must be a positive int; got 0"),
    (["sample", "{cond}", "--steps", "-3", *_SAMPLE], "num_inference_steps must be a positive int; got -3"),
    (["sample", "{cond}", "--steps", "1001", *_SAMPLE], "num_inference_steps=1001 is outside"),
    (["sample", "{cond}", "--scheduler", "nope", *_SAMPLE], "unknown scheduler 'nope'"),
    (["sample", "{uncond}", "--class", "3", "--steps", "2", *_SAMPLE], "unconditional: class_labels must be None"),
    (["sample", "{uncond}", "--guidance", "2", "--steps", "2", *_SAMPLE], "pass guidance_scale=None"),
    (["sample", "{cond}", "--class", "11", "--steps", "2", *_SAMPLE], "class_labels must lie in 0..9"),
    (["sample", "{cond}", "-n", "0", "--steps", "2", *_SAMPLE], "num_images must be a positive int"),
    (["sample", "{cond}", "--seed", "-1", "--steps", "2", *_SAMPLE], "seed must lie in [0, 2**64)"),
    (["sample", "{cond}", "--guidance", "nan", "--steps", "2", *_SAMPLE], "guidance_scale must be a finite number"),
    (["sample", "{cond}", "--eta", "0.5", "--scheduler", "euler", "--steps", "2", *_SAMPLE], "only used by DDIM"),
    (["sample", "{cond}", "--threads", "0", "--steps", "2", *_SAMPLE], "num_threads must be a positive integer"),
    (["sample", "{cond}", "--precision", "fp16", "--steps", "2", *_SAMPLE], "has no fp16 graph"),
    (["sample", "{cond}", "--steps", "2", "-n", "2", "--out", "{folder}", "--no-progress"],
     "is a folder; give a file name"),
    pytest.param(["sample", "{cond}", "--nrow", "0", "--steps", "2", *_SAMPLE], "--nrow",
                 id="sample-nrow-0"),
    pytest.param(["sample", "{cond}", "--nrow", "-1", "--steps", "2", *_SAMPLE], "--nrow",
                 id="sample-nrow-negative"),
    pytest.param(["sample", "{cond}", "--scale", "0", "--steps", "2", *_SAMPLE], "--scale",
                 id="sample-scale-0"),
    pytest.param(["sample", "{cond}", "--scale", "-2", "--steps", "2", *_SAMPLE], "--scale",
                 id="sample-scale-negative"),
    # bench
    (["bench", "{missing}", "--no-baseline"], "the folder does not exist"),
    (["bench", "{cond}", "--no-baseline", "--steps", "0", "--repeats", "1", "--batch", "1"], "--steps 0"),
    (["bench", "{cond}", "--no-baseline", "--steps", "-3", "--repeats", "1", "--batch", "1"], "--steps -3"),
    (["bench", "{cond}", "--no-baseline", "--steps", "2", "--repeats", "1", "--batch", "0"], "--batch [0]"),
    (["bench", "{cond}", "--no-baseline", "--scheduler", "nope"], "unknown scheduler 'nope'"),
    (["bench", "{cond}", "--no-baseline", "--threads", "0"], "num_threads must be a positive integer"),
    pytest.param(["bench", "{cond}", "--no-baseline", "--steps", "2", "--repeats", "0", "--batch", "1"], "repeats",
                 id="bench-repeats-0"),
    pytest.param(["bench", "{cond}", "--no-baseline", "--steps", "2", "--repeats", "-1", "--batch", "1"], "repeats",
                 id="bench-repeats-negative"),
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
    words = ["minus" + a[1:] if re.fullmatch(r"-[0-9.]+", a) else a for a in case[0]
             if a not in ("--no-progress", "--out", "{new}")]
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


@pytest.mark.parametrize("argv, command, message", [
    (["timesteps", "--steps", "0"], "timesteps", "num_inference_steps=0 is outside"),
    (["inspect", "{missing}"], "inspect", "BundleError: no bundle at"),
    (["sample", "{file}", "--out", "{new}", "--no-progress"], "sample", "is a file, not a bundle folder"),
], ids=["timesteps-steps-0", "inspect-missing", "sample-file"])
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
        (["sample", paths["cond"], "--class", "a", "--out", paths["new"]], "sample", "argument --class: expected a "
                                                                                     "class index"),
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


# -- 2. runtime: bad latents, too many steps, scheduler configs ----------------------------------------------------
@pytest.fixture(scope="module")
def counted(cond_run_bundle):
    """A DDIM pipeline on the conditional bundle whose model calls are counted."""
    pipe = Pipeline.from_bundle(cond_run_bundle, scheduler="ddim", num_threads=1)
    runner = CountingRunner(pipe.runner)
    return Pipeline(runner, pipe.model, pipe.scheduler_config, scheduler="ddim"), runner


SHAPE = (2, 1, 8, 8)


@pytest.mark.parametrize("dtype", [np.int8, np.int32, np.uint8, np.bool_, np.complex64, np.complex128, object, "U1"])
def test_latents_of_a_non_float_dtype_are_refused(counted, dtype):
    """Latents of an integer, bool, complex, object or string dtype raise ValueError `latents must be floating point;
    got dtype ...` before the model is called (complex values are never silently cast to their real part)."""
    pipe, runner = counted
    runner.calls = 0
    latents = np.zeros(SHAPE, dtype=dtype)
    with pytest.raises(ValueError, match=r"latents must be floating point; got dtype"):
        pipe(num_images=2, num_inference_steps=3, latents=latents, class_labels=1)
    assert runner.calls == 0


def _with(value, where=(1, 0, 3, 5), dtype=np.float32):
    x = TorchGenerator(0).randn(SHAPE).astype(dtype)
    x[where] = value
    return x


@pytest.mark.parametrize("latents", [
    np.full(SHAPE, np.nan, np.float32), _with(np.nan), _with(np.inf), _with(-np.inf),
    _with(np.nan, dtype=np.float16), _with(1e300, dtype=np.float64),  # finite in float64, inf once cast to float32
], ids=["all-nan", "one-nan", "one-inf", "one-minus-inf", "float16-nan", "float64-overflows-float32"])
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_non_finite_latents_are_refused(counted, latents):
    """Latents holding NaN or +-inf (also a float64 value that overflows float32) raise NonFiniteError `latents has N
    non-finite value(s)` before the model is called, instead of sampling NaN images."""
    pipe, runner = counted
    runner.calls = 0
    with pytest.raises(NonFiniteError, match=r"latents has \d+ non-finite value"):
        pipe(num_images=2, num_inference_steps=3, latents=latents, class_labels=1)
    assert runner.calls == 0


@pytest.mark.parametrize("name", list(SCHEDULER_NAMES))
@pytest.mark.parametrize("steps", [1001, 10**9])
def test_more_steps_than_training_timesteps_are_refused(counted, name, steps):
    """Asking any scheduler for more inference steps than the model's 1000 training timesteps raises ValueError
    `num_inference_steps=N is outside [1, num_train_timesteps=1000]` at once: no model call, no giant allocation."""
    pipe, runner = counted
    runner.calls = 0
    p = Pipeline(runner, pipe.model, pipe.scheduler_config, scheduler=name)
    with pytest.raises(ValueError, match=rf"num_inference_steps={steps} is outside \[1, num_train_timesteps=1000\]"):
        p(num_images=2, num_inference_steps=steps, seed=0, class_labels=1)
    assert runner.calls == 0


@pytest.mark.parametrize("cls", list(SCHEDULER_CLASSES.values()), ids=list(SCHEDULER_CLASSES))
def test_unknown_scheduler_config_keys_only_warn(cls):
    """A scheduler config with keys the class does not know (a newer diffusers' config) loads with a UserWarning naming
    them, as diffusers does, and the scheduler works."""
    with pytest.warns(UserWarning, match="some_future_option"):
        s = cls.from_config({"_class_name": cls.__name__, "_diffusers_version": "0.99.0", "some_future_option": 1,
                             "num_train_timesteps": 1000})
    s.set_timesteps(4)
    assert len(np.unique(np.asarray(s.timesteps))) == 4


@pytest.mark.parametrize("cls", list(SCHEDULER_CLASSES.values()), ids=list(SCHEDULER_CLASSES))
@pytest.mark.parametrize("key, value", [("beta_schedule", "nope"), ("prediction_type", "x"),
                                        ("timestep_spacing", "nope"), ("num_train_timesteps", 0),
                                        ("beta_start", -1.0)])
def test_invalid_scheduler_config_values_raise(cls, key, value):
    """`Scheduler.from_config({...: bad value})` raises ValueError naming the key (even alongside an unknown key, which
    only warns), never a scheduler that fails or drifts later."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=key):
            cls.from_config({"_class_name": cls.__name__, "some_future_option": 1, key: value})


def test_a_bundle_with_an_invalid_scheduler_config_is_refused_at_load(cond_run_bundle, tmp_path):
    """A bundle whose (re-hashed) scheduler_config.json says prediction_type "x" is refused by Pipeline.from_bundle
    with a ValueError naming prediction_type, not at the first sampling call."""
    from deploy_diff.runtime.bundle import sha256_file

    b = copy_bundle(cond_run_bundle, tmp_path / "b")
    cfg = json.loads((b / "scheduler_config.json").read_text())
    (b / "scheduler_config.json").write_text(json.dumps(dict(cfg, prediction_type="x")))

    def rehash(m):
        m["files"]["scheduler_config.json"].update(sha256=sha256_file(b / "scheduler_config.json"),
                                                   bytes=(b / "scheduler_config.json").stat().st_size)

    edit_manifest(b, rehash)
    with pytest.raises(ValueError, match="prediction_type='x'"):
        Pipeline.from_bundle(b, scheduler="ddim")


# -- 3. security ----------------------------------------------------------------------------------------------------
UNPICKLING_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def _dotted(node) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def _keyword(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
    return None


def unpickling_problems(source: str, rel: str) -> tuple[list[str], int]:
    """Every way ``source`` could unpickle a file, as ``rel:line: what``; and its number of torch.load calls."""
    tree = ast.parse(source, filename=rel)
    problems, torch_loads = [], 0
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [(node.module or "").split(".")[0]]
            if node.module == "torch" and any(a.name == "load" for a in node.names):
                problems.append(f"{rel}:{node.lineno}: `from torch import load` hides torch.load from this scan")
        else:
            continue
        problems += [f"{rel}:{node.lineno}: imports {name}" for name in names if name in UNPICKLING_MODULES]
    for call in _calls(tree):
        func = _dotted(call.func)
        where = f"{rel}:{call.lineno}: {func}(...)"
        if func in ("eval", "exec") or func.split(".")[0] in UNPICKLING_MODULES:
            problems.append(where)
        elif func == "torch.load":
            torch_loads += 1
            wo = _keyword(call, "weights_only")
            if not (isinstance(wo, ast.Constant) and wo.value is True):
                problems.append(where + " without weights_only=True")
        elif func.split(".")[-1] == "load" and func.split(".")[0] in ("np", "numpy"):
            ap = _keyword(call, "allow_pickle")
            if ap is not None and not (isinstance(ap, ast.Constant) and ap.value is False):
                problems.append(where + " with allow_pickle not False")
    return problems, torch_loads


def test_the_unpickling_scan_catches_each_pattern():
    """The source scan below flags each forbidden pattern in a sample (so a clean scan means something)."""
    bad = ("import pickle\nfrom dill import loads\nimport numpy as np\nimport torch\npickle.load(f)\n"
           "np.load(p, allow_pickle=True)\ntorch.load(p)\ntorch.load(p, weights_only=False)\neval(s)\n"
           "from torch import load\n")
    problems, torch_loads = unpickling_problems(bad, "sample.py")
    assert torch_loads == 2
    for line in range(1, 11):
        if line not in (3, 4):
            assert any(p.startswith(f"sample.py:{line}:") for p in problems), (line, problems)
    ok = ("import numpy as np\nimport torch\nnp.load(p)\nnp.load(p, allow_pickle=False)\n"
          "torch.load(p, weights_only=True)\n")
    assert unpickling_problems(ok, "ok.py") == ([], 1)


def test_package_source_never_unpickles():
    """A scan of every deploy_diff/**/*.py finds no pickle-family import, no pickle.load(s), no eval/exec, no
    np.load(allow_pickle=True), and every torch.load passes weights_only=True, so no user file can run code."""
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20
    problems, torch_loads = [], 0
    for path in files:
        found, n = unpickling_problems(path.read_text(encoding="utf-8"), str(path.relative_to(PACKAGE.parent)))
        problems += found
        torch_loads += n
    assert not problems, "\n".join(problems)
    assert torch_loads >= 1  # the scan does see the trainer-state read


@pytest.fixture
def evil_run(cond_run_dir, tmp_path):
    """A copy of the conditional run whose trainer_state.pt carries a Payload, with config.json's sha256 updated so
    the checkpoint's integrity check passes and only the safe loader stands in the way."""
    import torch

    run = tmp_path / "run"
    shutil.copytree(cond_run_dir, run)
    marker = tmp_path / "PAYLOAD_RAN"
    state = torch.load(run / "trainer_state.pt", weights_only=True)
    state["optimizer"] = Payload(marker)
    torch.save(state, run / "trainer_state.pt")
    cfg = json.loads((run / "config.json").read_text())
    cfg["files"]["trainer_state.pt"] = hashlib.sha256((run / "trainer_state.pt").read_bytes()).hexdigest()
    (run / "config.json").write_text(json.dumps(cfg))
    # the payload is live: an unsafe load runs it (on a throwaway copy)
    torch.load(run / "trainer_state.pt", weights_only=False)
    assert marker.exists()
    marker.unlink()
    return run, marker


def test_a_malicious_trainer_state_is_refused_and_never_runs(evil_run, capsys):
    """A trainer_state.pt holding a pickled object whose __reduce__ creates a file is refused by read_trainer_state
    (CheckpointError) and by `deploy-diff train --resume` (exit 1), and the file is never created."""
    from deploy_diff.train.checkpoint import CheckpointError, find_checkpoint, read_trainer_state

    run, marker = evil_run
    ckpt = find_checkpoint(run)
    assert ckpt.path == run  # the tampered top level itself, not a fallback to checkpoints/step_N
    with pytest.raises(CheckpointError, match="trainer_state.pt holds objects other than tensors"):
        read_trainer_state(ckpt)
    assert not marker.exists()
    assert main(["train", "--out", str(run), "--resume", "--steps", "40", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("deploy-diff train: error: CheckpointError: ") and "trainer_state.pt" in err
    assert "Traceback" not in err
    assert not marker.exists()


def test_a_malicious_trainer_state_error_is_one_safe_line(evil_run, capsys):
    """`deploy-diff train --resume` on a tampered trainer_state.pt should print one line that names the file and the
    refused global, without suggesting weights_only=False."""
    run, _ = evil_run
    assert main(["train", "--out", str(run), "--resume", "--steps", "40", "--no-progress"]) == 1
    line = one_error_line(capsys.readouterr().err, "train")
    assert "weights_only` set to `False" not in line and "\x1b[" not in line


def test_a_malicious_diffusers_bin_is_refused_and_never_runs(diffusers_pipeline_dir, tmp_path, capsys):
    """`deploy-diff export --from-diffusers` on a UNet folder whose diffusion_pytorch_model.bin carries a pickled
    payload exits 1 with one line `cannot load the UNet` (diffusers reads .bin with weights_only=True); the payload
    never runs."""
    import torch

    unet = tmp_path / "unet"
    unet.mkdir()
    shutil.copy(diffusers_pipeline_dir / "unet" / "config.json", unet / "config.json")
    marker = tmp_path / "PAYLOAD_RAN"
    torch.save({"conv_in.weight": Payload(marker)}, unet / "diffusion_pytorch_model.bin")
    rc = main(["export", "--from-diffusers", str(unet), "--out", str(tmp_path / "bundle")])
    line = one_error_line(capsys.readouterr().err, "export")
    assert rc == 1 and "cannot load the UNet" in line
    assert not marker.exists() and not (tmp_path / "bundle").exists()


def test_a_manifest_entry_through_a_symlinked_directory_is_refused(cond_run_bundle, tmp_path, monkeypatch):
    """A manifest entry `linked/secret.bin` where `linked` is a symlink to a folder outside the bundle raises
    BundleError `resolves outside the bundle folder` and the outside file is never opened (not even hashed)."""
    import deploy_diff.runtime.bundle as bundle_mod

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.bin").write_bytes(b"secret")
    b = copy_bundle(cond_run_bundle, tmp_path / "b")
    (b / "linked").symlink_to(outside, target_is_directory=True)
    entry = {"sha256": hashlib.sha256(b"secret").hexdigest(), "bytes": 6}
    edit_manifest(b, lambda m: m["files"].update({"linked/secret.bin": entry}))
    hashed = []
    real = bundle_mod.sha256_file
    monkeypatch.setattr(bundle_mod, "sha256_file", lambda p, *a, **k: hashed.append(Path(p)) or real(p, *a, **k))
    with pytest.raises(BundleError, match="resolves outside the bundle folder"):
        load_bundle(b)
    with pytest.raises(BundleError, match="resolves outside the bundle folder"):
        Pipeline.from_bundle(b)
    assert hashed and not any(outside in p.resolve().parents for p in hashed)


def test_a_bundle_reached_through_a_symlink_still_loads(cond_run_bundle, tmp_path):
    """Confinement is relative to the bundle's real folder: a bundle opened through a symlinked path (e.g. a `current`
    link to the latest release) loads and samples normally."""
    (tmp_path / "current").symlink_to(cond_run_bundle, target_is_directory=True)
    pipe = Pipeline.from_bundle(tmp_path / "current", scheduler="ddim", num_threads=1)
    assert pipe(num_images=1, num_inference_steps=2, seed=0, class_labels=3).shape == (1, 8, 8, 1)


@pytest.mark.parametrize("key, value, match", [
    ("in_channels", 0, "out of range"), ("in_channels", -1, "out of range"), ("in_channels", 1025, "out of range"),
    ("in_channels", 10**12, "out of range"), ("out_channels", 0, "out of range"),
    ("out_channels", 2049, "out of range"), ("out_channels", 10**12, "out of range"),
    ("sample_size", [8, 0], "out of range"), ("sample_size", [8, 10**6], "out of range"),
    ("sample_size", -8, "out of range"),
    ("in_channels", "many", "malformed"), ("in_channels", None, "malformed"), ("out_channels", [1], "malformed"),
])
def test_manifest_channels_and_sizes_out_of_range_are_refused(cond_run_bundle, tmp_path, key, value, match):
    """A manifest claiming channels outside 1..1024 (out: 1..2048), a side outside 1..8192, or a non-integer size
    raises BundleError before any array or session is created (the huge 10^12-element input already has its test)."""
    b = copy_bundle(cond_run_bundle, tmp_path / "b")
    edit_manifest(b, lambda m: m["model"].update({key: value}))
    with pytest.raises(BundleError, match=match):
        Pipeline.from_bundle(b)


# -- 4. load: one pipeline, many threads -----------------------------------------------------------------------------
def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


THREADS, CALLS, WARMUP = 8, 320, 40
RSS_BOUND = 50 * 2**20


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc (Linux) for VmRSS")
def test_one_pipeline_shared_by_8_threads_for_320_calls(cond_run_bundle):
    """One DDIM Pipeline (3 steps, 2 images) shared by 8 threads for 320 calls, each with its own seed, label and
    guidance, returns for every call exactly the serial images for that seed, and RSS grows < 50 MiB after warm-up.

    The bound: one call's own arrays are ~10 KiB, so a steady state adds nothing; the warm-up (40 calls on the same
    8 pool threads) has already created every per-thread malloc arena and ONNX Runtime's arena blocks, which are
    reused afterwards. A leak of >= 160 KiB per call (e.g. a retained batch, scheduler or ORT output per call) would
    exceed 50 MiB over 320 calls; allocator noise stays well below it.
    """
    pipe = Pipeline.from_bundle(cond_run_bundle, scheduler="ddim", num_threads=1)
    lock = threading.Lock()
    inflight = {"now": 0, "max": 0}

    def call(seed):
        with lock:
            inflight["now"] += 1
            inflight["max"] = max(inflight["max"], inflight["now"])
        try:
            return pipe(num_images=2, num_inference_steps=3, seed=seed, class_labels=[seed % 10, (seed + 3) % 10],
                        guidance_scale=None if seed % 2 else 2.0)
        finally:
            with lock:
                inflight["now"] -= 1

    seeds = list(range(CALLS))
    serial = [call(s) for s in seeds]
    assert len({a.tobytes() for a in serial}) == CALLS  # every seed gives different images
    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        warm = list(pool.map(call, range(10_000, 10_000 + WARMUP)))
        del warm
        gc.collect()
        rss_before = _rss_bytes()
        results = list(pool.map(call, seeds))
        gc.collect()
        rss_after = _rss_bytes()
    assert inflight["max"] >= 2, "the calls never overlapped: the test did not exercise concurrency"
    mismatched = [s for s, got, want in zip(seeds, results, serial) if not np.array_equal(got, want)]
    assert not mismatched, f"{len(mismatched)} of {CALLS} threaded calls differ from the serial images: " \
                           f"seeds {mismatched[:10]}"
    growth = rss_after - rss_before
    assert growth < RSS_BOUND, f"RSS grew {growth / 2**20:.1f} MiB over {CALLS} calls (bound {RSS_BOUND / 2**20} MiB)"
