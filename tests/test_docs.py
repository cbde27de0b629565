"""README and docs/ read on GitHub: every relative link and image resolves, no machine path, README stays short."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 200

FENCED = re.compile(r"^(```|~~~).*?^\1", flags=re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")  # [text](target), ![alt](target)
EXTERNAL = re.compile(r"^(https?:|mailto:|#)", flags=re.I)
LOCAL_PATH = re.compile(r"(?<![\w.~])(/work/|/root/|/home/|/tmp/|/Users/|[A-Za-z]:\\)")


def pages(root: Path) -> list[Path]:
    """README.md and every Markdown file under docs/."""
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def link_targets(text: str) -> list[str]:
    """Targets of Markdown links and images, outside code (a link's text may hold code)."""
    return LINK.findall(INLINE_CODE.sub("", FENCED.sub("", text)))


def broken_links(root: Path) -> list[str]:
    """'page: target' for each relative link or image whose file does not exist (anchors stripped)."""
    broken = []
    for page in pages(root):
        for target in link_targets(page.read_text(encoding="utf-8")):
            if EXTERNAL.match(target):
                continue
            path = target.split("#", 1)[0]
            if not (page.parent / path).exists():
                broken.append(f"{page.relative_to(root)}: {target}")
    return broken


def machine_paths(root: Path) -> list[str]:
    """'page:line: text' for each line that names an absolute local path, code included."""
    return [
        f"{page.relative_to(root)}:{number}: {line.strip()}"
        for page in pages(root)
        for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1)
        if LOCAL_PATH.search(line)
    ]


def test_every_relative_link_and_image_resolves() -> None:
    assert broken_links(ROOT) == []


def test_no_absolute_local_path() -> None:
    assert machine_paths(ROOT) == []


def test_readme_is_a_landing_page() -> None:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines"


@pytest.fixture
def docs_copy(tmp_path: Path) -> Path:
    """README.md and docs/ copied, so a test can break them."""
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    return tmp_path


def test_the_checks_see_a_broken_link_a_missing_image_and_a_machine_path(docs_copy: Path) -> None:
    broken_before, paths_before = broken_links(docs_copy), machine_paths(docs_copy)
    page = docs_copy / "docs" / "README.md"
    page.write_text(
        page.read_text(encoding="utf-8")
        + "\n[gone](no_such_page.md#part) ![lost](img/none.png) [ok](results.md#speed) [web](https://example.com/x)\n"
        + "`python tools/train.py --data /home/me/data.yaml`\n",
        encoding="utf-8",
    )
    added = [hit for hit in broken_links(docs_copy) if hit not in broken_before]
    assert added == ["docs/README.md: no_such_page.md#part", "docs/README.md: img/none.png"]
    added = [hit for hit in machine_paths(docs_copy) if hit not in paths_before]
    assert [hit.split(":")[0] for hit in added] == ["docs/README.md"]


def test_links_inside_code_are_not_links_and_a_links_text_may_be_code() -> None:
    text = "```\n[a](missing.md)\n```\nsee `[b](missing.md)` and [`c/`](c/report.md) or ![d](d.png)\n"
    assert link_targets(text) == ["c/report.md", "d.png"]
