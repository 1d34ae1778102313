"""Helpers shared by the reliability tests in this folder: running the CLI and reading its one-line errors,
editing bundle copies, injecting process and file-system faults (SIGKILL, a file-size limit, ENOSPC, EROFS),
counting model calls, and the hypothesis settings and clean-refusal rule of the fuzzing tests.

The test files import it as ``_reliability`` (pytest puts each test file's folder on ``sys.path``).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st

import deploy_diff
from deploy_diff.runtime.schedulers import SCHEDULER_CLASSES
from deploy_diff.runtime.schedulers.beta_schedules import SCHEDULES

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "deploy_diff.cli"]
ENV = dict(
    os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
)


# -- the CLI's error contract -------------------------------------------------------------------------------------
def one_error_line(err: str, command: str) -> str:
    """The CLI's error contract: exactly one stderr line ``deploy-diff <command>: error: ...``, no traceback."""
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{err}"
    assert lines[0].startswith(f"deploy-diff {command}: error: "), err
    assert "Traceback" not in err
    return lines[0]


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``python -m deploy_diff.cli ARGS`` in a real process; stdout and stderr are captured as text."""
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )


def error_line(stderr: str, command: str) -> str:
    """The CLI's error: the last line of stderr, ``deploy-diff COMMAND: error: ...``, and no traceback."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines and "Traceback" not in stderr, stderr
    assert lines[-1].startswith(f"deploy-diff {command}: error: "), stderr
    assert sum("error" in line.lower() for line in lines) == 1, stderr
    return lines[-1]


# -- bundle copies ------------------------------------------------------------------------------------------------
def copy_bundle(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_manifest(bundle: Path, edit) -> None:
    path = bundle / "deploy_diff.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


# -- process and file-system faults -------------------------------------------------------------------------------
def tree(path: Path) -> dict[str, bytes]:
    """Every file under ``path``, hidden ones included, with its bytes."""
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def leftovers(parent: Path, name: str) -> list[str]:
    """Hidden siblings of ``parent/name``: ``.NAME.partial-*`` / ``.NAME.old-*`` (export), ``.NAME.*.tmp`` (files)."""
    return sorted(p.name for p in parent.glob(f".{name}.*"))


def dead_pid() -> int:
    """The pid of a process that has certainly exited (and been reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def wait_for(cond, proc: subprocess.Popen, timeout: float = 120.0) -> bool:
    """Poll ``cond()`` every 10 ms until it holds, ``proc`` exits or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        if proc.poll() is not None:
            return bool(cond())
        time.sleep(0.01)
    return False


def kill9(proc: subprocess.Popen) -> None:
    assert proc.poll() is None, "the process finished before it could be killed (the test needs a longer run)"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def fsize_limit(nbytes: int):
    """``preexec_fn`` for a child whose writes past ``nbytes`` bytes fail with EFBIG ("File too large")."""

    def preexec():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))

    return preexec


@contextlib.contextmanager
def file_size_limit(nbytes: int):
    """The same limit in this process, for the duration of the block."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)


def read_only_folder(monkeypatch, folder: Path, name: str) -> None:
    """Creating a file or folder (``tempfile.NAME(dir=folder)``) in ``folder`` fails with EROFS."""
    real = getattr(tempfile, name)

    def refuse(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == folder:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dir))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, name, refuse)


class FullDisk:
    """A file whose first write lands 16 bytes and then fails the way a full disk fails it (ENOSPC)."""

    def __init__(self, f):
        self._f = f

    def write(self, data):
        self._f.write(bytes(data)[:16])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self._f, name)


# -- the model, counted ----------------------------------------------------------------------------------------------
class CountingRunner:
    """Wraps a runner and counts model calls: a refused call must never reach the model."""

    def __init__(self, runner):
        self.runner, self.calls = runner, 0

    def __call__(self, *args):
        self.calls += 1
        return self.runner(*args)


# -- fuzzing: hypothesis settings and what counts as a clean refusal ----------------------------------------------
MAX_EXAMPLES = int(os.environ.get("DEPLOY_DIFF_HYPOTHESIS_EXAMPLES", "40"))
FUZZ = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
NAMES = sorted(SCHEDULER_CLASSES)
PACKAGE_DIR = os.path.dirname(os.path.abspath(deploy_diff.__file__)) + os.sep


def deploy_diff_frames(exc: BaseException) -> list[traceback.FrameSummary]:
    return [f for f in traceback.extract_tb(exc.__traceback__) if os.path.abspath(f.filename).startswith(PACKAGE_DIR)]


def raised_in(exc: BaseException, *functions: str) -> bool:
    frames = deploy_diff_frames(exc)
    return bool(frames) and frames[-1].name in functions


def where_raised(exc: BaseException) -> str:
    frames = deploy_diff_frames(exc) or traceback.extract_tb(exc.__traceback__)
    return f"{frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name}" if frames else "?"


#: open bugs, each pinned by a strict xfail test; the random tests tolerate exactly these signatures
#: (name -> predicate on the exception, e.g. its type and ``raised_in(exc, 'function')``)
KNOWN_BUGS: dict = {}  # every bug this fuzzing found is fixed; none is tolerated


def _known_bug(exc: BaseException) -> str | None:
    return next((name for name, matches in KNOWN_BUGS.items() if matches(exc)), None)


def assert_clean_refusal(exc: BaseException, what: str) -> None:
    """ValueError (BundleError included) or TypeError with a message; never a decode error or anything else."""
    bug = _known_bug(exc)
    if bug is not None:
        event(f"known bug: {bug}")
        return
    clean = isinstance(exc, (ValueError, TypeError)) and not isinstance(exc, UnicodeError) and str(exc).strip()
    if not clean:
        raise AssertionError(
            f"{what}: {type(exc).__module__}.{type(exc).__qualname__} escaped ({exc!r:.300}) at {where_raised(exc)}"
        ) from exc
    event(f"refused: {type(exc).__name__}")


# every string some option accepts (including diffusers' aliases), so random text never hits a valid one
VALID_STRINGS = set(SCHEDULES) | {
    "epsilon",
    "v_prediction",
    "sample",
    "flow_prediction",
    "leading",
    "trailing",
    "linspace",
    "zero",
    "sigma_min",
    "dpmsolver",
    "dpmsolver++",
    "sde-dpmsolver",
    "sde-dpmsolver++",
    "deis",
    "midpoint",
    "heun",
    "logrho",
    "bh1",
    "bh2",
    "fixed_small",
    "fixed_small_log",
    "fixed_large",
    "fixed_large_log",
    "learned",
    "learned_range",
    "linear",
    "log_linear",
    "discrete",
    "continuous",
    "exponential",
}
NOT_FINITE = st.sampled_from([float("nan"), float("inf"), float("-inf")])
