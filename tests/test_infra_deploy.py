"""The deployment files keep their promises: the Dockerfile.

No image can be built here (no registry of base images is reachable), so the
Dockerfile is checked by parsing it: its stages, its user, its entrypoint, and
its build context against .dockerignore.
"""

from __future__ import annotations

import contextlib
import fnmatch
import io
import json
import tomllib
from pathlib import Path
from typing import Any

from dockerfile_parse import DockerfileParser  # type: ignore[import-untyped]

from voteflow.cli import main as voteflow_main

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
# Packages that would bring a compiler into the final image.
COMPILERS = ("build-essential", "gcc", "g++", "clang", "make", "libc6-dev", "python3-dev")


# -- the Dockerfile -----------------------------------------------------------


def _stages() -> list[list[dict[str, Any]]]:
    """The Dockerfile's instructions, one list per stage (each starts at FROM)."""
    with DOCKERFILE.open("rb") as file:
        parser = DockerfileParser(fileobj=file)
        structure: list[dict[str, Any]] = parser.structure
    stages: list[list[dict[str, Any]]] = []
    for instruction in structure:
        if instruction["instruction"] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(instruction)
    return stages


def _values(stage: list[dict[str, Any]], instruction: str) -> list[str]:
    return [i["value"] for i in stage if i["instruction"] == instruction]


def _console_script() -> str:
    with (REPO / "pyproject.toml").open("rb") as file:
        scripts: dict[str, str] = tomllib.load(file)["project"]["scripts"]
    [name] = [n for n, target in scripts.items() if target == "voteflow.cli:main"]
    return name


def _accepts(command: list[str]) -> bool:
    """The voteflow CLI knows this command line (its --help exits 0)."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            voteflow_main([*command, "--help"])
    except SystemExit as exc:
        return exc.code == 0
    return False


def image_uid() -> int:
    [user] = _values(_stages()[-1], "USER")
    return int(user.split(":")[0])


def test_image_is_built_in_one_stage_and_runs_from_a_slim_one_without_compilers() -> None:
    stages = _stages()
    assert len(stages) >= 2, "a build stage and a runtime stage"
    final = stages[-1]
    base = final[0]["value"].split()[0]
    assert base.startswith("python:3.11-") and "slim" in base, base
    for run in _values(final, "RUN"):
        words = run.replace(";", " ").replace("&&", " ").split()
        assert not set(words) & set(COMPILERS), f"a compiler in the final stage: {run}"
    # What the final stage copies comes from the build stage: the virtualenv only.
    names = {s[0]["value"].split()[-1] for s in stages[:-1] if " AS " in s[0]["value"].upper()}
    for copy in _values(final, "COPY"):
        source = next((w for w in copy.split() if w.startswith("--from=")), "")
        assert source.removeprefix("--from=") in names, f"copied from outside a stage: {copy}"
        assert copy.split()[-2:] == ["/opt/venv", "/opt/venv"], copy
    # The build stage installs the project itself, none of its extras.
    installs = [r for s in stages[:-1] for r in _values(s, "RUN") if "pip install" in r]
    assert any("pip install ." in r for r in installs), installs
    assert not any("[" in r for r in installs), f"extras in the image: {installs}"


def test_image_runs_as_an_unprivileged_numeric_user() -> None:
    [user] = _values(_stages()[-1], "USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) > 0, f"USER {user}: a numeric uid other than 0"
    assert not gid or (gid.isdigit() and int(gid) > 0), f"USER {user}"


def test_image_entrypoint_is_the_console_script_and_its_commands_exist() -> None:
    final = _stages()[-1]
    [entrypoint] = [json.loads(v) for v in _values(final, "ENTRYPOINT")]
    [cmd] = [json.loads(v) for v in _values(final, "CMD")]
    assert Path(entrypoint[0]).name == _console_script(), entrypoint
    assert cmd == ["edge"], cmd
    for command in (cmd, ["worker"], ["migrate"]):
        assert _accepts(command), command
    assert not _accepts(["no-such-command"])  # the check above can fail


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern that matches the path (or a parent) wins."""
    ignored = False
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    for pattern in patterns:
        negated = pattern.startswith("!")
        pattern = pattern.removeprefix("!").rstrip("/")
        if any(fnmatch.fnmatchcase(prefix, pattern) for prefix in prefixes) or (
            pattern.startswith("**/") and fnmatch.fnmatchcase(parts[-1], pattern[3:])
        ):
            ignored = not negated
    return ignored


def test_build_context_holds_what_the_dockerfile_copies_and_no_more() -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copied = [
        word
        for stage in _stages()
        for copy in _values(stage, "COPY")
        if "--from=" not in copy
        for word in copy.split()[:-1]
    ]
    assert copied
    for source in copied:
        assert (REPO / source).exists(), source
        assert not _ignored(source.rstrip("/"), patterns), f".dockerignore leaves out {source}"
        if (REPO / source).is_dir():
            for file in (REPO / source).rglob("*"):
                if file.is_file() and "__pycache__" not in file.parts:
                    relative = file.relative_to(REPO).as_posix()
                    assert not _ignored(relative, patterns), relative
    for kept_out in (".git", ".venv", "tests/conftest.py", ".voteflow", "loadtest/run.py"):
        assert _ignored(kept_out, patterns), f"{kept_out} would be sent to the builder"
