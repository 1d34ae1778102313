"""Configuration sweeps shared by the scheduler parity tests.

A *space* maps each config key to the values it may take (``{"steps": [1, 2, 7], "thresholding": [False, True]}``).
``sample_cases`` draws a seeded random sample of it, ``cross_product`` enumerates all of it, ``case_id`` names
a case for pytest ids and failure messages, and ``run_sweep`` runs a check on many cases and reports every
failure at once.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Iterable

Case = dict


def _keep(case: Case, valid: Callable[[Case], bool] | None) -> bool:
    return valid is None or bool(valid(case))


def sample_cases(
    space: dict,
    n: int,
    seed: int,
    valid: Callable[[Case], bool] | None = None,
    normalise: Callable[[Case], Case] | None = None,
    max_draws: int = 1_000_000,
) -> list[Case]:
    """``n`` distinct cases drawn from ``space`` with ``random.Random(seed)``, in draw order.

    Each draw picks one value per key (in the space's key order); ``normalise`` (if given) maps the draw to the
    case it stands for (e.g. values that make others irrelevant), and cases ``valid`` rejects are skipped.
    """
    rng = random.Random(seed)
    cases: list[Case] = []
    for _ in range(max_draws):
        if len(cases) == n:
            return cases
        case = {k: rng.choice(v) for k, v in space.items()}
        if normalise is not None:
            case = normalise(case)
        if _keep(case, valid) and case not in cases:
            cases.append(case)
    if len(cases) == n:
        return cases
    raise ValueError(f"found only {len(cases)} distinct valid cases of the {n} asked for in {max_draws} draws")


def cross_product(
    space: dict,
    valid: Callable[[Case], bool] | None = None,
    normalise: Callable[[Case], Case] | None = None,
    base: Case | None = None,
) -> list[Case]:
    """Every valid combination of ``space`` (each laid over ``base``, when given), in ``itertools.product`` order."""
    keys = list(space)
    out = []
    for values in itertools.product(*space.values()):
        case = dict(base or {})
        case.update(zip(keys, values))
        if normalise is not None:
            case = normalise(case)
        if _keep(case, valid):
            out.append(case)
    return out


# short labels: a key's label prefixes its numbers and stands alone for a true boolean
LABELS = {
    "steps": "n",
    "solver_order": "o",
    "steps_offset": "off",
    "rescale_betas_zero_snr": "zsnr",
    "thresholding": "thr",
    "clip_sample": "clip",
    "set_alpha_to_one": "a1",
    "use_clipped_model_output": "ucmo",
    "eta": "eta",
    "predict_x0": "px0",
    "lower_order_final": "lof",
    "euler_at_final": "eaf",
    "disable_corrector": "dc",
    "lambda_min_clipped": "lclip",
    "variance_type": "",
    "timestep_type": "",
    "churn": "",
}
# short spellings of common string values
SHORT = {"epsilon": "eps", "v_prediction": "v", "sample": "x0", "flow_prediction": "flow"}


def case_id(case: Case) -> str:
    """A readable, distinct name for a case: its values joined by ``-``.

    Strings appear as themselves (``SHORT`` spellings for prediction types); numbers and tuples after their key's
    label (``n10``, ``o2``, ``dc1_3``); a true boolean as its key's label alone. False, None, ``()`` and -inf are
    the defaults of their keys and are left out.
    """
    parts = []
    for key, value in case.items():
        label = LABELS.get(key, key)
        if value is None or value is False or value == () or (isinstance(value, float) and value == -math.inf):
            continue
        if value is True:
            parts.append(label)
        elif isinstance(value, str):
            parts.append(SHORT.get(value, value))
        elif isinstance(value, tuple):
            parts.append(label + "_".join(map(str, value)))
        else:
            parts.append(f"{label}{value}")
    return "-".join(parts)


def run_sweep(
    cases: Iterable[Case],
    run_case: Callable[[Case], object],
    name: Callable[[Case], str] = case_id,
    error: Callable[[object], float] | None = None,
) -> float:
    """Run ``run_case`` on every case; fail listing the failing cases (all of them are run); return the worst error.

    ``error`` maps ``run_case``'s result to its error; by default the result is the error, or a tuple whose first
    entry is the error.
    """
    failures, worst = [], 0.0
    for case in cases:
        try:
            result = run_case(case)
        except AssertionError as e:
            failures.append(f"{name(case)}: {e}")
            continue
        if error is not None:
            err = error(result)
        else:
            err = result[0] if isinstance(result, tuple) else result
        worst = max(worst, float(err if err is not None else 0.0))
    assert not failures, f"{len(failures)} failures, e.g. {failures[:5]}"
    print(f"worst relative error {worst:.3g}")
    return worst
