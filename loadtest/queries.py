"""SQL of the load test and the bench, kept in .sql files beside the code
that runs it: each statement under a ``-- name: <name>`` line."""

from __future__ import annotations

from pathlib import Path


def named(path: Path) -> dict[str, str]:
    """The statements of `path` by name (the text up to the next name, its
    last semicolon dropped; one name may hold several statements)."""
    found = {}
    for part in path.read_text(encoding="utf-8").split("-- name: ")[1:]:
        name, text = part.split("\n", 1)
        found[name.strip()] = text.strip().rstrip(";")
    return found
