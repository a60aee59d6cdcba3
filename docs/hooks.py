"""MkDocs hooks of the documentation site (mkdocs.yml ``hooks:``).

Two placeholders are filled when a page is built, so that nothing generated is committed:

- ``<!-- readme: HEADING -->`` becomes the body of README.md's ``## HEADING`` section (one source
  for the figures and the commands behind them); a heading that no longer exists fails the build.
- ``<!-- generated: requests -->`` becomes the request tables printed by ``vhostuser-rs requests
  --json`` (front-end requests with what the back-end role does with each, then back-end
  requests), run with the Python that runs MkDocs: the package must be installed there.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
README_PLACEHOLDER = re.compile(r"<!-- readme: (.+?) -->")
GENERATED_PLACEHOLDER = re.compile(r"<!-- generated: (\w+) -->")


def readme_section(heading: str) -> str:
    """The text under README.md's ``## heading``, up to the next ``## `` heading."""
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    if match is None:
        raise ValueError(f"README.md has no '## {heading}' section (docs placeholder '<!-- readme: {heading} -->')")
    return match.group(1).strip() + "\n"


def _cell(value: object) -> str:
    return str(value if value is not None else "").replace("|", "\\|") or " "


def _requests(channel: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        [sys.executable, "-m", "vhostuser_rs", "requests", "--channel", channel, "--json"],
        check=True, capture_output=True, text=True, timeout=60,
    ).stdout
    rows: list[dict[str, Any]] = json.loads(out)
    if not rows:
        raise ValueError(f"vhostuser-rs requests --channel {channel} printed no request")
    return rows


def _table(rows: list[dict[str, Any]], columns: dict[str, str]) -> list[str]:
    lines = ["| " + " | ".join(columns.values()) + " |", "|" + "|".join("---:" if k == "code" else "---" for k in columns) + "|"]
    lines += ["| " + " | ".join(_cell(r.get(k)) for k in columns) + " |" for r in rows]
    return lines


def requests_tables() -> str:
    """Markdown tables of both channels' requests, from the installed package."""
    main = _requests("main")
    parts = ["### What the back-end role does with each front-end request\n"]
    parts += _table(main, {"code": "code", "name": "request", "backend": "back-end", "offer": "offered",
                           "refusal": "when refused", "note": "what it does"})
    parts += ["", "### Front-end requests: the spec's rules\n"]
    parts += _table(main, {"code": "code", "name": "request", "reply": "reply", "fds": "fds", "gate": "gate"})
    parts += ["", "### Back-end requests (back-end request channel): the spec's rules\n"]
    parts += _table(_requests("backend"), {"code": "code", "name": "request", "reply": "reply", "fds": "fds", "gate": "gate"})
    return "\n".join(parts) + "\n"


GENERATORS = {"requests": requests_tables}


def on_page_markdown(markdown: str, **_kwargs: Any) -> str:
    markdown = README_PLACEHOLDER.sub(lambda m: readme_section(m.group(1)), markdown)
    return GENERATED_PLACEHOLDER.sub(lambda m: GENERATORS[m.group(1)](), markdown)
