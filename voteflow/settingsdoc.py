"""The settings table of docs/operations.md, written from :class:`Settings`.

Each setting is declared once, in ``voteflow/settings.py``: its name (and so
its ``VOTEFLOW_*`` variable), its default, and its meaning, the docstring under
the field. ``make docs`` (``python -m voteflow.settingsdoc docs/operations.md``)
rewrites the table between the two markers below; ``tests/unit/test_docs.py`` fails
when the file's table is not the one made here. Development code: neither the
edge nor the workers import it (``make lint`` holds them to that).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import sys
from pathlib import Path
from typing import Any

from . import settings

BEGIN = "<!-- settings: written by `make docs` from voteflow/settings.py; edit there -->"
END = "<!-- end of settings -->"


def meanings() -> dict[str, str]:
    """Each field's docstring, on one line: the string that follows it in the class."""
    (cls,) = ast.parse(inspect.getsource(settings.Settings)).body
    assert isinstance(cls, ast.ClassDef)
    body = cls.body
    found: dict[str, str] = {}
    for field, after in zip(body, [*body[1:], None], strict=True):
        if not (isinstance(field, ast.AnnAssign) and isinstance(field.target, ast.Name)):
            continue
        if not (
            isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            raise ValueError(f"Settings.{field.target.id} has no docstring: say what it means")
        found[field.target.id] = " ".join(after.value.value.split())
    return found


def _default(value: Any) -> str:
    if value is None or value == "":
        return "(none)"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"`{value}`"


def table() -> str:
    """The Markdown table: one row per field of Settings, in its order."""
    meaning = meanings()
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for field in dataclasses.fields(settings.Settings):
        name = f"`{settings.PREFIX}{field.name.upper()}`"
        text = meaning[field.name].replace("|", "\\|")
        rows.append(f"| {name} | {_default(field.default)} | {text} |")
    return "\n".join(rows) + "\n"


def rewrite(page: str) -> str:
    """``page`` with the table between its markers made anew."""
    start, end = page.find(BEGIN), page.find(END)
    if start < 0 or end < start:
        raise ValueError(f"the page has no {BEGIN!r} ... {END!r} markers")
    return page[: start + len(BEGIN)] + "\n" + table() + page[end:]


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m voteflow.settingsdoc docs/operations.md", file=sys.stderr)
        return 2
    path = Path(argv[0])
    page = path.read_text()
    new = rewrite(page)
    if new != page:
        path.write_text(new)
        print(f"{path}: settings table rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
