"""Faults while ``deploy-diff sample`` writes its grid (PNG) or arrays (``--npz``): a file-size limit, a full disk
(ENOSPC) and a read-only folder (EROFS). The existing output file is kept byte for byte and no temporary file is left
beside it. Every test's docstring says what was tried, what the user sees and what is kept.

The tests run as root, so ``chmod`` cannot make a folder unwritable: a write failure is made real with
``RLIMIT_FSIZE`` (writes past the limit fail with EFBIG, the way a full disk or a quota fails them: SIGXFSZ is
ignored, as Python itself does), or injected as ``OSError(ENOSPC)`` / ``OSError(EROFS)`` where a subprocess would be
too slow.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess

import pytest
from _reliability import CLI, ENV, FullDisk, error_line, fsize_limit, read_only_folder

from deploy_diff.cli import main

SAMPLE = ["-n", "2", "--steps", "2", "--seed", "0", "--threads", "1", "--no-progress"]


@pytest.mark.parametrize("npz", [False, True], ids=["png", "npz"])
def test_sample_output_write_fails(bundle, tmp_path, npz):
    """`deploy-diff sample --out grid.png` (or `--npz`) whose output cannot be written (a 64-byte file-size limit:
    EFBIG, as on a full disk): exit 1 with one line `deploy-diff sample: error: OSError: [Errno 27] File too
    large`; the existing output file is byte for byte untouched and no temporary file is left beside it."""
    out = tmp_path / ("grid.npz" if npz else "grid.png")
    out.write_bytes(b"the previous output")
    res = subprocess.run(
        [*CLI, "sample", str(bundle), "--out", str(out), *SAMPLE, *(["--npz"] if npz else [])],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=fsize_limit(64),
    )
    assert res.returncode == 1, res.stderr
    assert "File too large" in error_line(res.stderr, "sample")
    assert out.read_bytes() == b"the previous output"
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]


@pytest.mark.parametrize("fault", ["ENOSPC", "EROFS"])
def test_sample_on_a_full_disk_or_in_a_read_only_folder(bundle, tmp_path, monkeypatch, capsys, fault):
    """`deploy-diff sample --out grid.png` on a full disk (the PNG write fails after 16 bytes: ENOSPC) or in a
    read-only folder (the temporary file cannot be created: EROFS): exit 1 with one line `deploy-diff sample: error:
    OSError: [Errno 28] No space left on device` / `[Errno 30] Read-only file system: '<folder>'`; the existing
    grid.png is byte for byte untouched and no temporary file is left."""
    from deploy_diff.runtime import _fileio, images

    out = tmp_path / "grid.png"
    out.write_bytes(b"the previous grid")
    if fault == "ENOSPC":

        @contextlib.contextmanager
        def full_disk(path):
            with _fileio.atomic_open(path) as f:
                yield FullDisk(f)

        monkeypatch.setattr(images, "atomic_open", full_disk)
    else:
        read_only_folder(monkeypatch, tmp_path, "mkstemp")
    assert main(["sample", str(bundle), "--out", str(out), *SAMPLE]) == 1
    line = error_line(capsys.readouterr().err, "sample")
    assert os.strerror(getattr(errno, fault)) in line
    assert out.read_bytes() == b"the previous grid"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png"]


def test_sample_write_error_names_the_file(bundle, tmp_path, monkeypatch, capsys):
    """`deploy-diff sample --out grid.png` on a full disk: the one error line names the file that could not be
    written (`... No space left on device: '.../grid.png'`)."""
    from deploy_diff.runtime import _fileio, images

    @contextlib.contextmanager
    def full_disk(path):
        with _fileio.atomic_open(path) as f:
            yield FullDisk(f)

    monkeypatch.setattr(images, "atomic_open", full_disk)
    out = tmp_path / "grid.png"
    assert main(["sample", str(bundle), "--out", str(out), *SAMPLE]) == 1
    assert "grid.png" in error_line(capsys.readouterr().err, "sample")
