"""The documentation's code samples run (docs/*.md, the site mkdocs.yml builds).

Every ```python block compiles and every ```sh block passes ``bash -n`` (README.md's too). On
each page of docs/, the ```python blocks not marked ``{.no-run}`` (those serve forever or need
a VM) are joined in page order and run as one script in a fresh directory, as a reader would
paste them: the tutorials start their own peers and stop them. A page with ``<!-- doc-test: needs BINARY -->`` needs that
peer (skipped without it locally; CI has every peer, so there it fails).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from peers import need

DOCS = Path(__file__).resolve().parents[2] / "docs"
FENCE = re.compile(r"^```(\w*)[ \t]*(.*)$")
NEEDS = re.compile(r"<!-- doc-test: needs (\S+) -->")


@dataclass
class Block:
    page: str
    line: int
    lang: str
    attrs: str
    code: str

    @property
    def runs(self) -> bool:
        return self.lang == "python" and ".no-run" not in self.attrs


def blocks(page: Path) -> list[Block]:
    """The fenced code blocks of one page (top-level fences of three backticks)."""
    found: list[Block] = []
    lines = page.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m and m.group(1):
            start = i
            body: list[str] = []
            i += 1
            while i < len(lines) and lines[i] != "```":
                body.append(lines[i])
                i += 1
            assert i < len(lines), f"{page.name}:{start + 1}: unterminated code block"
            found.append(Block(page.name, start + 1, m.group(1), m.group(2), "\n".join(body) + "\n"))
        i += 1
    return found


PAGES = sorted(DOCS.glob("*.md"))
ALL_BLOCKS = [b for page in [*PAGES, DOCS.parent / "README.md"] for b in blocks(page)]


def test_the_docs_have_code() -> None:
    assert sum(b.runs for b in ALL_BLOCKS) >= 5, "the tutorials' runnable samples were not found"


@pytest.mark.parametrize("block", [b for b in ALL_BLOCKS if b.lang == "python"], ids=lambda b: f"{b.page}:{b.line}")
def test_python_block_compiles(block: Block) -> None:
    compile(block.code, f"{block.page}:{block.line}", "exec")


@pytest.mark.parametrize("block", [b for b in ALL_BLOCKS if b.lang in ("sh", "bash")], ids=lambda b: f"{b.page}:{b.line}")
def test_shell_block_parses(block: Block) -> None:
    result = subprocess.run(["bash", "-n"], input=block.code, capture_output=True, text=True, timeout=10)
    assert result.returncode == 0, f"{block.page}:{block.line}: {result.stderr}"


RUNNABLE_PAGES = [p for p in PAGES if any(b.runs for b in blocks(p))]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("page", RUNNABLE_PAGES, ids=lambda p: p.name)
def test_page_runs(page: Path, tmp_path: Path) -> None:
    for binary in NEEDS.findall(page.read_text()):
        need(shutil.which(binary), binary)
    script = tmp_path / f"{page.stem}_doc.py"
    # Each block keeps its line numbers in tracebacks' context: a comment names its origin.
    script.write_text("".join(f"# --- {b.page}:{b.line}\n{b.code}" for b in blocks(page) if b.runs))
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=150,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert result.returncode == 0, f"{page.name}'s samples failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
