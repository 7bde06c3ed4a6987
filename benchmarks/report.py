"""Writing a benchmark's Markdown report: the lines joined, the results folder made, the file
written and the text echoed to stdout (the run's log shows what was written)."""

from __future__ import annotations

from pathlib import Path


def write_report(lines: list[str], out: Path) -> str:
    text = "\n".join(lines) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    return text
