"""The README and docs/: short README, links that resolve, repository paths that exist."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# A path of this repository as the pages name them: a top-level folder, then more.
REPO_PATH = re.compile(r"`((?:csrc|sigreg_kernels|python|tests|bench|docs|\.ci)/[\w./*-]*)`")


def test_readme_is_short_and_keeps_its_two_commands():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    for marker in ("<!-- readme:main-command -->", "<!-- readme:test-command -->"):
        assert text.count(marker) == 1, marker


def test_links_resolve():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)", page.read_text()):
            if not target.startswith(("http://", "https://")) and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, broken


def test_named_repository_paths_exist():
    missing = []
    for page in PAGES:
        for path in REPO_PATH.findall(page.read_text()):
            path = path.rstrip(".")
            if "<" in path or not (any(ROOT.glob(path)) or (ROOT / path).exists()):
                missing.append(f"{page.relative_to(ROOT)}: {path}")
    assert not missing, missing
