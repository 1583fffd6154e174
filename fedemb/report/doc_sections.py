"""One section of a Markdown page replaced in place: how each benchmark script writes its own part of
docs/performance.md without touching the parts other scripts wrote."""

from __future__ import annotations

from pathlib import Path


def replace_section(text: str, heading: str, section: str) -> str:
    """`text` with the section under `heading` (up to the next level-2 heading) replaced by `section`,
    or `section` appended where there is none."""
    start = text.find(heading + "\n")
    if start < 0:
        return text.rstrip("\n") + "\n\n" + section
    end = text.find("\n## ", start + len(heading))
    return text[:start] + section + (text[end:] if end >= 0 else "")


def write_section(page: Path, heading: str, section: str, title: str = "# Simulation performance") -> None:
    """Replace (or add) `heading`'s section of the page at `page`, creating the page under `title`."""
    old = page.read_text() if page.is_file() else title + "\n"
    page.write_text(replace_section(old, heading, section))
