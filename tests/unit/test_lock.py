"""requirements.lock holds the versions installed and tested: every dependency
pyproject.toml names is pinned there, and the environment running this suite
(made by `make`, from the lock) has exactly those versions."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata

from tests.support import REPO

LOCK = REPO / "requirements.lock"


def _name(requirement: str) -> str:
    """PEP 503's normal form of a requirement's project name."""
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement.strip())
    assert match is not None, requirement
    return re.sub(r"[-_.]+", "-", match.group(0)).lower()


def _locked() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        match = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line)
        if match:
            pins[_name(match.group(1))] = match.group(2)
    return pins


def test_every_dependency_pyproject_names_is_pinned() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        declared += extra
    missing = sorted({_name(r) for r in declared} - set(_locked()))
    assert missing == [], f"not in requirements.lock (run make lock): {missing}"


def test_the_versions_installed_are_the_locked_ones() -> None:
    differ = {}
    for name, version in _locked().items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = None
        if installed != version:
            differ[name] = (version, installed)
    assert differ == {}, f"locked vs installed (make reinstalls from the lock): {differ}"
