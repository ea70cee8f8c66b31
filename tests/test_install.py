"""The install: ranges in pyproject.toml, exact versions in constraints.txt, and make using both."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent


def _requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = [r for reqs in project["optional-dependencies"].values() for r in reqs]
    return [Requirement(r) for r in project["dependencies"] + extras]


def _pins() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = Version(version)
    return pins


def test_every_dependency_is_a_range_that_holds_its_pinned_version():
    pins = _pins()
    for req in _requirements():
        ops = {s.operator for s in req.specifier}
        assert ops == {">=", "<"}, f"{req}: give a tested lower bound and the next major as upper bound"
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        assert name in pins, f"{req.name} has no exact version in constraints.txt"
        assert req.specifier.contains(pins[name]), f"constraints.txt pins {name}=={pins[name]} outside {req}"
    assert str(pins["torch"]) == "2.13.0"   # the CPU build make installs (the torch trap)


def test_make_installs_with_the_constraints():
    makefile = (ROOT / "Makefile").read_text()
    install = next(line for line in makefile.splitlines() if "pip install" in line)
    assert "-c constraints.txt" in install and ".[backends,test]" in install


def test_citation_names_the_paper():
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["authors"]
    assert any("2604.00923" in ref["url"] for ref in cff["references"])
