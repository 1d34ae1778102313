"""Each scheduler rule is written once: counted over the source of ``deploy_diff/`` (an AST walk, no imports).

A second copy of a rule (a step-index lookup, a sigma list, the float32 ``alphas_cumprod`` replica, thresholding,
the denoised-and-slope step) is how the three rules for a repeated timestep came about; this test makes a new copy
fail. It also checks that no runtime module imports scipy (the runtime installs without it) and that the
zero-SNR constant 2**-24 is written once.
"""

from __future__ import annotations

import ast
import functools
from collections import Counter
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[3] / "deploy_diff"
RUNTIME = PACKAGE / "runtime"


@functools.cache
def _trees(root: Path) -> dict[Path, ast.Module]:
    """Parsed once per test session: the package does not change while the tests run."""
    return {p: ast.parse(p.read_text(encoding="utf-8"), filename=str(p)) for p in sorted(root.rglob("*.py"))}


@functools.cache
def _definitions(root: Path) -> Counter:
    """How often each function / method name is defined under ``root``."""
    counts: Counter = Counter()
    for tree in _trees(root).values():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                counts[node.name] += 1
    return counts


# rule -> the one function that implements it (aliases a second copy might be given are listed too)
RULES = {
    "step-index lookup": ("index_for_timestep", "_init_step_index", "_current_index"),
    "Karras sigmas": ("karras_sigmas", "karras_sigma_list"),
    "exponential sigmas": ("exponential_sigmas",),
    "beta sigmas": ("beta_sigmas", "beta_ppf", "betainc"),
    "Lu sigmas": ("lu_sigmas",),
    "float32 alphas_cumprod replica": ("diffusers_float32_alphas_cumprod", "_alphas_cumprod_f32", "_float32_replica"),
    "torch float32 linspace": ("torch_linspace_f32", "_torch_linspace_f32"),
    "thresholding": ("dynamic_threshold", "_threshold_sample"),
    "denoised and slope": ("denoised_and_slope", "to_d"),
    "sigma to timestep": ("sigma_to_t",),
    "spacings": ("spaced_timesteps", "float_spaced_timesteps", "multistep_spaced_timesteps"),
}


@pytest.mark.parametrize("rule", list(RULES))
def test_each_rule_is_defined_once(rule):
    counts = _definitions(PACKAGE)
    names = RULES[rule]
    for name in names:
        assert counts[name] <= 1, f"{rule}: {name} is defined {counts[name]} times in deploy_diff/"
    assert counts[names[0]] == 1, f"{rule}: {names[0]} is not defined in deploy_diff/"


def test_the_retired_copies_are_gone():
    counts = _definitions(PACKAGE)
    for name in (
        "_spaced_timesteps_dpm",
        "_spacing_timesteps",
        "_converted_sigma_list",
        "_sigma_list",
        "_beta_ppf",
        "_rescale_zero_terminal_snr_f32",
        "_cumprod_f32",
        "karras_sigma_list",
    ):
        assert counts[name] == 0, f"{name} is defined again"


def test_no_runtime_module_imports_scipy():
    for path, tree in _trees(RUNTIME).items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mods = [node.module or ""]
            else:
                continue
            assert not any(m == "scipy" or m.startswith("scipy.") for m in mods), f"{path} imports scipy"


def test_the_zero_snr_constant_is_written_once():
    written = []  # (rng.py's 2**-24 is a float32 mantissa step, another meaning: the schedulers are searched)
    for path, tree in _trees(RUNTIME / "schedulers").items():
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.BinOp)
                and isinstance(node.op, ast.Pow)
                and isinstance(node.left, ast.Constant)
                and node.left.value == 2
                and isinstance(node.right, ast.UnaryOp)
                and isinstance(node.right.operand, ast.Constant)
                and node.right.operand.value == 24
            ):
                written.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
            elif isinstance(node, ast.Constant) and isinstance(node.value, float) and node.value == 2.0**-24:
                written.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert len(written) == 1, written


def test_the_counting_sees_definitions():
    """The walk finds what it looks for (a count of 0 everywhere would pass the tests above vacuously)."""
    counts = _definitions(PACKAGE)
    assert counts["karras_sigmas"] == 1 and counts["step"] >= 5 and counts["set_timesteps"] >= 5


def test_the_former_schedules_module_re_exports_the_beta_schedules():
    from deploy_diff.runtime import schedules
    from deploy_diff.runtime.schedulers import beta_schedules

    for name in (*beta_schedules.__all__, "MAX_TRAIN_TIMESTEPS", "SEED_SCHEDULES"):
        assert getattr(schedules, name) is getattr(beta_schedules, name), name
