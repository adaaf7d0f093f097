"""The pinned dependency set: every requirement in ``constraints.txt``, and the Makefile using it."""

from __future__ import annotations

import re
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import REPO

CONSTRAINTS = REPO / "constraints.txt"


def _pins() -> dict[str, str]:
    """``{canonical name: version}`` of the ``name==version`` lines of constraints.txt."""
    pins = {}
    for number, line in enumerate(CONSTRAINTS.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.!+_-]+)", line)
        assert match, f"constraints.txt:{number}: {line!r} is not a 'name==version' pin"
        name = canonicalize_name(match[1])
        assert name not in pins, f"constraints.txt:{number}: {match[1]} is pinned twice"
        pins[name] = match[2]
    return pins


def _requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = [r for group in project.get("optional-dependencies", {}).values() for r in group]
    return [Requirement(r) for r in project["dependencies"] + extras]


def test_every_declared_dependency_is_pinned_exactly() -> None:
    pins = _pins()
    requirements = _requirements()
    assert requirements
    for req in requirements:
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} (pyproject.toml) has no '==' pin in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {req.name}=={pins[name]}, outside pyproject.toml's '{req.specifier}'")
    assert "weightdiff" not in pins  # the project itself is installed editable, never pinned


def test_torch_pin_fits_cpu_and_cuda_builds_and_matches_the_makefile() -> None:
    torch_pin = _pins()["torch"]
    assert "+" not in torch_pin, f"torch=={torch_pin}: a local label (+cpu/+cu*) would force one build"
    makefile = (REPO / "Makefile").read_text()
    torch_var = re.search(r"^TORCH\s*:?=\s*(\S+)\s*$", makefile, re.M)
    assert torch_var, "Makefile has no 'TORCH := torch==<version>' line"
    assert torch_var[1] == f"torch=={torch_pin}"


def test_makefile_installs_with_the_constraints() -> None:
    makefile = (REPO / "Makefile").read_text()
    variables = dict(re.findall(r"^([A-Z_]+)\s*:?=\s*(.*?)\s*$", makefile, re.M))
    stamp = re.search(r"^\$\(STAMP\):(.*)\n((?:\t.*\n)+)", makefile, re.M)
    assert stamp, "Makefile has no $(STAMP) install rule"
    recipe = re.sub(r"\$\(([A-Z_]+)\)", lambda m: variables.get(m[1], m[0]), stamp[2])
    installs = [line for line in recipe.splitlines() if "pip install" in line]
    assert installs, "the $(STAMP) rule runs no 'pip install'"
    for line in installs:
        assert re.search(r"(-c|--constraint)[ =]constraints\.txt\b", line), f"install without constraints: {line}"
    prerequisites = re.sub(r"\$\(([A-Z_]+)\)", lambda m: variables.get(m[1], m[0]), stamp[1]).split()
    assert "constraints.txt" in prerequisites, "a changed constraints.txt must reinstall the venv"
    for target in ("test", "demo"):
        assert re.search(rf"^{target}:.*\$\(STAMP\)", makefile, re.M), f"'make {target}' skips the install"


def test_lock_target_rewrites_constraints_only_after_the_tests_pass() -> None:
    makefile = (REPO / "Makefile").read_text()
    lock = re.search(r"^lock:.*\n((?:\t.*\n)+)", makefile, re.M)
    assert lock, "Makefile has no 'lock' target"
    lines = lock[1].splitlines()
    runs_tests = next(i for i, line in enumerate(lines) if "pytest" in line)
    writes = next(i for i, line in enumerate(lines) if re.search(r"mv .*CONSTRAINTS|> *constraints\.txt", line))
    assert runs_tests < writes
    assert not any("-c $(CONSTRAINTS)" in line or "-c constraints.txt" in line for line in lines)  # newest releases
