"""Tests, docs and configs read only files inside the repository, so a fresh clone passes on its own.

Real sample files that tests need are bundled in tests/fixtures/ or data/samples/ (with attribution),
never read from a folder beside the checkout or from the machine that wrote the test.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CHECKED = ["tests", "docs", "README.md", "configs", ".ci"]
SKIP_DIRS = {"__pycache__", ".pytest_cache"}

# A reference to the folder beside the checkout that only CI has (as `../NAME`, `.parent / "NAME"`,
# `"NAME" / "samples"`) or to an absolute path into /work/, the machine these tests were written on.
OUTSIDE = re.compile(
    r"\.\.[/\\]+shared\b"
    r"|shared[/\\]+samples"
    r"|[\"']shared[\"']\s*[/,]\s*[\"']samples[\"']"
    r"|(?:\.parent|\.parents\[\d+\])\s*/\s*[\"']shared[\"']"
    r"|(?<![\w.~/-])/work/"
)


# The folder's name, spelt in two parts so this file's own examples are not references themselves.
BESIDE = "sha" + "red"


def outside_references(text: str) -> list[str]:
    """The lines of `text` that point outside the repository, as `line number: line`."""
    return [f"{i}: {line.strip()}" for i, line in enumerate(text.splitlines(), 1) if OUTSIDE.search(line)]


def _checked_files() -> list[Path]:
    files = []
    for name in CHECKED:
        root = REPO / name
        candidates = [root] if root.is_file() else sorted(root.rglob("*")) if root.is_dir() else []
        for path in candidates:
            if path.is_file() and not SKIP_DIRS & set(path.relative_to(REPO).parts) and path != Path(__file__).resolve():
                files.append(path)
    return files


@pytest.mark.parametrize(
    "line",
    [
        f'SHARED = Path(__file__).resolve().parents[1].parent / "{BESIDE}" / "samples"',
        f'SHARED_SAMPLES = REPO.parent / "{BESIDE}" / "samples"',
        f"rsclip data caption --images ../{BESIDE}/samples/deepforest --out x.csv",
        f'os.path.join(root, "{BESIDE}", "samples")',
        'Image.open("/work/main/data/samples/tiles/a.png")',
        "cd /work/main && python -m pytest",
    ],
)
def test_the_check_catches_references_outside(line):
    assert outside_references(f"ok\n{line}\n") == [f"2: {line}"]


@pytest.mark.parametrize(
    "line",
    [
        'SAMPLES = REPO / "data" / "samples"',
        "mask = Image.open('tests/fixtures/solaris/sample_fp_mask.tif')",
        "The machine was shared with other jobs during these runs",
        "see https://example.org/work/docs and network/work/ and ~/work/x",
    ],
)
def test_the_check_passes_references_inside(line):
    assert outside_references(line) == []


def test_tests_docs_and_configs_stay_inside_the_repository():
    files = _checked_files()
    assert any(p.parent.name == "tests" for p in files) and any(p.parent.name == "docs" for p in files)
    found = {}
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:  # images and other binary fixtures
            continue
        if lines := outside_references(text):
            found[path.relative_to(REPO).as_posix()] = lines
    assert not found, f"files that read outside the repository (bundle what they need instead): {found}"
