"""Helpers shared by the benchmarks: each owns one '## <title>' section of docs/benchmarks.md."""

from __future__ import annotations

import re
from pathlib import Path

HEADER = "# Benchmarks\n\nEach section is written by the script named in it; rerun that script to refresh it.\n"


def write_section(path: Path, title: str, body: str) -> None:
    """Replace (or append) the section whose heading starts with ``## <title word>``."""
    text = path.read_text() if path.exists() else HEADER
    key = title.split(" (")[0]
    pattern = re.compile(rf"^## {re.escape(key)}\b.*?(?=^## |\Z)", re.S | re.M)
    block = f"## {title}\n\n{body.strip()}\n\n"
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
