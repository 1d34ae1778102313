"""The staging folder of an export: build a bundle beside its destination, then rename it into place.

``with staging_folder(out) as folder:`` yields a new hidden folder ``.NAME.partial-PID-*`` beside ``out``; when the
block ends normally its files are made read-only for others (0644), flushed to disk and the folder is renamed to
``out``, replacing a bundle already there (the old one is renamed aside first, then removed). When the block raises
(a failed validation, a full disk, Ctrl-C), the folder is removed and ``out`` is as it was. A folder at ``out`` that
is not a bundle is never touched. An export killed outright (SIGKILL, power loss) cannot clean up; the next export to
the same ``out`` does, in :func:`remove_stale_leftovers`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..runtime.bundle import MANIFEST_NAME, is_bundle
from .sources import ExportError

__all__ = ["check_destination", "install", "remove_stale_leftovers", "staging_folder"]


def check_destination(out: Path) -> None:
    """Refuse to write over anything that is not a bundle (an empty folder is fine)."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ExportError(f"out={str(out)!r} exists and is not a folder; refusing to overwrite it")
    if out.is_dir() and not is_bundle(out) and any(out.iterdir()):
        raise ExportError(
            f"out={str(out)!r} is a folder that is not a bundle (no {MANIFEST_NAME}); refusing to "
            "overwrite it. Choose a new path or an existing bundle"
        )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_leftovers(out: Path) -> None:
    """Remove the hidden ``.NAME.partial-PID-*`` and ``.NAME.old-PID-*`` folders beside ``out`` whose process is gone
    (a killed export's). A kill between the two renames of :func:`install` leaves the previous bundle in an ``old``
    folder and none at ``out``: it is moved back. Folders of a running export are left alone."""
    if not out.parent.is_dir():
        return
    for p in out.parent.glob(f".{out.name}.*-*"):
        kind, _, rest = p.name[len(out.name) + 2 :].partition("-")
        pid = rest.split("-", 1)[0]
        if kind in ("partial", "old") and pid.isdigit() and p.is_dir() and not _pid_alive(int(pid)):
            if kind == "old" and not out.exists() and is_bundle(p / "bundle"):
                os.replace(p / "bundle", out)  # killed between the two renames: put the previous bundle back
            shutil.rmtree(p, ignore_errors=True)


def _seal(folder: Path) -> None:
    """Files 0644, the folder 0755, every file flushed to disk (so the rename never installs unwritten data)."""
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            os.chmod(p, 0o644)
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    os.chmod(folder, 0o755)


def install(folder: Path, out: Path) -> None:
    """Rename the finished ``folder`` to ``out``, replacing an existing bundle (checked again right before): the old
    bundle is renamed to ``.NAME.old-PID-*/bundle`` first, put back if the second rename fails, removed after."""
    check_destination(out)
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-{os.getpid()}-"))
        os.replace(out, old / "bundle")
    try:
        os.replace(folder, out)
    except BaseException:
        if old is not None:
            os.replace(old / "bundle", out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staging_folder(out: Path) -> Iterator[Path]:
    """Yield a new hidden folder beside ``out`` to build a bundle in; install it at ``out`` when the block ends
    normally, remove it when the block raises. Removes killed exports' leftovers first."""
    check_destination(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_leftovers(out)
    folder = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-{os.getpid()}-"))
    try:
        yield folder
        _seal(folder)
        install(folder, out)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
