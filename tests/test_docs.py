"""The documentation stays true to the repository.

* every ``tests/<path>.py::test_name`` that ``README.md`` or ``docs/*.md`` cites exists (so moving or renaming a
  test cannot leave a stale reference behind);
* every relative link in those files points at a file of the repository;
* no tracked text file refers to the design notes or folders that lived outside the repository (the repository
  is self-contained; ``docs/design.md`` is the design document);
* ``README.md`` stays a short user's README (at most 250 lines) and no test module grows past 500 lines;
* the test suite has not lost assertions (``tools/count_assertions.py``, baseline 884).
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

README_MAX_LINES = 250
TEST_FILE_MAX_LINES = 500
ASSERTIONS_BASELINE = 1070  # tools/count_assertions.py over tests/ without this file: 884 before issue 10, 1,070 after

# `tests/runtime/test_pipeline.py::test_bad_call_arguments`, `...::TestX::test_y`, `...::test_z[param-id]`
CITATION = re.compile(r"(tests/[\w./-]+?\.py)((?:::\w+)+)(?:\[[^\]`]*\])?")
# [text](target) or [text](target#anchor) or [text](#anchor), relative targets only
LINK = re.compile(r"\]\((?!https?://|mailto:)([^)\s#]*)(?:#([^)\s]*))?\)")
# built from pieces so that this file does not match the pattern it looks for
EXTERNAL_REFERENCE = re.compile("DESIGN" + r"\.md|" + r"\.\." + "/shared")


def _citations() -> list[tuple[str, str, str]]:
    """(doc file, test file, '::'-separated names) for every test cited in the docs."""
    found = []
    for doc in DOC_FILES:
        for m in CITATION.finditer(doc.read_text(encoding="utf-8")):
            found.append((doc.relative_to(ROOT).as_posix(), m.group(1), m.group(2)))
    return found


def _defined_names(path: Path) -> dict[str, set[str]]:
    """Top-level functions and classes of a module (key ""), and the methods of each class (key: class name)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: dict[str, set[str]] = {"": set()}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names[""].add(node.name)
        if isinstance(node, ast.ClassDef):
            names[node.name] = {n.name for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    return names


def _missing(test_file: str, chain: str) -> str | None:
    """Why ``test_file::chain`` does not exist, or None when it does."""
    path = ROOT / test_file
    if not path.is_file():
        return f"{test_file} does not exist"
    names = _defined_names(path)
    parts = chain.strip(":").split("::")
    if parts[0] not in names[""]:
        return f"{test_file} defines no {parts[0]}"
    if len(parts) == 2 and parts[1] not in names.get(parts[0], set()):
        return f"{test_file}::{parts[0]} has no method {parts[1]}"
    if len(parts) > 2:
        return f"{test_file}{chain}: nested classes are not supported in citations"
    return None


def test_cited_tests_exist():
    citations = _citations()
    # docs/reliability.md cites dozens of tests: finding none would mean the pattern no longer matches the docs
    assert len(citations) >= 30, f"only {len(citations)} test citations found in {[d.name for d in DOC_FILES]}"
    stale = sorted(
        {f"{doc}: {why}" for doc, test_file, chain in citations if (why := _missing(test_file, chain)) is not None}
    )
    assert not stale, "docs cite tests that do not exist:\n" + "\n".join(stale)


def test_citation_check_can_fail():
    """The existence check itself: a real test is found, a made-up one and a missing file are reported."""
    assert _missing("tests/test_docs.py", "::test_cited_tests_exist") is None
    assert "defines no" in _missing("tests/test_docs.py", "::test_that_was_never_written")
    assert "does not exist" in _missing("tests/no_such_file.py", "::test_x")
    m = CITATION.search("`tests/runtime/test_pipeline.py::test_bad_call_arguments[ddim-0]`")
    assert m is not None and (m.group(1), m.group(2)) == ("tests/runtime/test_pipeline.py", "::test_bad_call_arguments")


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(md: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", md.read_text(encoding="utf-8"), flags=re.S)  # no headings inside code blocks
    return {_anchor(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, flags=re.M)}


def test_relative_links_in_the_docs_resolve():
    broken = []
    for doc in DOC_FILES:
        for m in LINK.finditer(doc.read_text(encoding="utf-8")):
            target_name, anchor = m.group(1), m.group(2)
            target = (doc.parent / target_name).resolve() if target_name else doc
            if not target.exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target_name} does not exist")
            elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
                broken.append(f"{doc.relative_to(ROOT)}: {target_name}#{anchor} names no heading of {target.name}")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_link_check_can_fail():
    assert _anchor("Export: times and validation errors") == "export-times-and-validation-errors"
    assert _anchor("torch-compatible noise") == "torch-compatible-noise"
    assert "layout" in _anchors(ROOT / "docs" / "design.md")
    m = LINK.search("see [the sweep](docs/benchmarks.md#schedulers-quality-against-steps).")
    assert m is not None and m.groups() == ("docs/benchmarks.md", "schedulers-quality-against-steps")
    assert LINK.search("[web](https://example.com/x.md)") is None


def _tracked_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
        return [ROOT / p for p in out.decode().split("\0") if p]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (an unpacked archive): walk the tree
        skip = {".git", ".venv", "build", "dist", "__pycache__", ".hypothesis", "demo", "runs"}
        files = []
        for folder, dirs, names in os.walk(ROOT):
            dirs[:] = [d for d in dirs if d not in skip and not d.endswith(".egg-info")]
            files.extend(Path(folder) / n for n in names)
        return files


def test_no_file_refers_outside_the_repository():
    offenders = []
    files = _tracked_files()
    assert ROOT / "pyproject.toml" in files and ROOT / "README.md" in files
    for path in files:
        if not path.is_file():  # deleted in the working tree but still in the index
            continue
        data = path.read_bytes()
        if b"\0" in data[:8192]:  # binary (images, ...)
            continue
        for lineno, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
            if EXTERNAL_REFERENCE.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{lineno}: {line.strip()[:100]}")
    assert not offenders, (
        "these lines cite files outside the repository (docs/design.md is the design "
        "document):\n" + "\n".join(offenders)
    )


def test_external_reference_pattern_matches_what_it_should():
    assert EXTERNAL_REFERENCE.search("see " + "DESIGN" + ".md, section 3")
    assert EXTERNAL_REFERENCE.search("the notes in .." + "/shared/device/README.md")
    assert not EXTERNAL_REFERENCE.search("docs/design.md and ./shared_helpers.py")


def test_readme_is_short():
    n = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines; at most {README_MAX_LINES} (the rest belongs in docs/)"


def test_no_test_file_is_over_500_lines():
    sizes = {
        p.relative_to(ROOT).as_posix(): len(p.read_text(encoding="utf-8").splitlines())
        for p in sorted((ROOT / "tests").rglob("*.py"))
    }
    assert len(sizes) > 10
    long = [f"{name}: {n} lines" for name, n in sizes.items() if n > TEST_FILE_MAX_LINES]
    assert not long, f"test files over {TEST_FILE_MAX_LINES} lines (split them):\n" + "\n".join(long)


def _count_assertions_module():
    spec = importlib.util.spec_from_file_location("count_assertions", ROOT / "tools" / "count_assertions.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_assertions_were_lost(tmp_path):
    counter = _count_assertions_module()
    counts = counter.count_tree(ROOT / "tests")
    total = sum(n for name, n in counts.items() if name != "test_docs.py")  # only the tests that were counted
    assert total >= ASSERTIONS_BASELINE, (
        f"the tests hold {total} assertions, fewer than the {ASSERTIONS_BASELINE} "
        "counted before the reorganisation: a move dropped some"
    )
    # the counter counts what it says it counts
    sample = tmp_path / "test_sample.py"
    sample.write_text(
        "import pytest\nimport numpy as np\n\ndef test_x():\n    assert 1\n"
        "    np.testing.assert_allclose(1, 1)\n    with pytest.raises(ValueError):\n        int('x')\n",
        encoding="utf-8",
    )
    assert counter.count_file(sample) == 3
