"""The shape of the package: one import name, and floors that only import downwards
(docs/design.md, "Layout and floors")."""

from __future__ import annotations

import ast
import re
import importlib
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.support import ROOT

# Each module's floor; a module imports only modules on its own floor or below.
FLOORS: dict[str, int] = {
    **dict.fromkeys(["handoff.constants", "handoff.errors", "handoff.settings", "handoff.models"], 0),
    **dict.fromkeys(["handoff.agents", "handoff.llm", "handoff.a2a_agent", "handoff.payloads", "handoff.registry",
                     "handoff.observability"], 1),
    **dict.fromkeys(["handoff.workflows", "handoff.activities"], 2),
    "handoff.client": 3,
    "handoff.workers": 4,
    **dict.fromkeys(["handoff.cli", "handoff.service", "handoff.a2a", "handoff.mcp", "handoff.servers",
                     "handoff.testing", "handoff.testbed", "handoff.examples", "handoff.eval", "handoff.console"], 5),
}
FOLDERS = {"handoff": "handoff", "workflows": "handoff.workflows", "activities": "handoff.activities",
           "workers": "handoff.workers", "examples": "handoff.examples"}
FRONT_DOOR = "handoff"  # handoff/__init__.py re-exports the public API of every floor


def module_files() -> dict[str, Path]:
    files = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            name = ".".join((package, *parts)).removesuffix(".__init__")
            files[name] = path
    return files


def floor_of(module: str) -> int:
    """The floor of `module` or of the package it lives in."""
    name = module
    while name not in FLOORS:
        if "." not in name:
            raise KeyError(f"{module} has no floor: add it to FLOORS (and to docs/design.md)")
        name = name.rsplit(".", 1)[0]
    return FLOORS[name]


def imports_of(path: Path) -> set[str]:
    """Every module `path` imports, at its top or inside a function."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
    return found


def test_every_module_has_a_floor():
    for name in module_files():
        if name != FRONT_DOOR:
            floor_of(name)


def test_no_module_imports_a_floor_above_its_own():
    upward = []
    for name, path in module_files().items():
        if name == FRONT_DOOR:
            continue
        for imported in imports_of(path):
            if imported.startswith("handoff.") and floor_of(imported) > floor_of(name):
                upward.append(f"{name} (floor {floor_of(name)}) imports {imported} (floor {floor_of(imported)})")
    assert not upward, "\n".join(upward)


def test_the_floor_check_would_catch_an_arrow_upwards():
    assert floor_of("handoff.workflows.chain") > floor_of("handoff.models")
    assert floor_of("handoff.workers.main") > floor_of("handoff.client.chains")
    assert floor_of("handoff.cli.chains") > floor_of("handoff.workers.agent_worker")


# The benchmark's peer (`bench/peer.py`) is built on the OpenAI Agents SDK, whose import name is
# `agents`; its test checks the SDK's tracing stays off.
OPENAI_AGENTS_SDK_USERS = {"bench/peer.py", "tests/test_bench.py"}


def test_no_module_imports_the_folders_by_their_own_names():
    """`workflows`, `activities`, `workers`, `examples` and `agents` are not import names (but
    `agents`, the OpenAI Agents SDK's, in the peer that runs on it and its test)."""
    bare = {"workflows", "activities", "workers", "examples", "agents"}
    offenders = []
    for path in [*module_files().values(), *ROOT.glob("tests/**/*.py"), *ROOT.glob("bench/*.py")]:
        name = str(path.relative_to(ROOT))
        for imported in imports_of(path):
            top = imported.split(".")[0]
            if top in bare and not (top == "agents" and name in OPENAI_AGENTS_SDK_USERS):
                offenders.append(f"{name} imports {imported}")
    assert not offenders, "\n".join(offenders)


def test_agents_is_the_openai_agents_sdk():
    """What `bench/peer.py` imports as `agents` is the OpenAI Agents SDK installed beside handoff,
    never a folder of this repository."""
    sdk = importlib.import_module("agents")
    origin = Path(sdk.__file__).resolve()
    assert "site-packages" in origin.parts and hasattr(sdk, "Runner") and hasattr(sdk, "handoff"), origin


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(out), str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )
    [built] = out.glob("handoff-*.whl")
    return zipfile.ZipFile(built)


def test_the_distribution_installs_one_import_name(wheel):
    top = {name.split("/")[0] for name in wheel.namelist()}
    dist_info = {t for t in top if t.endswith(".dist-info")}
    assert top - dist_info == {"handoff"}
    names = set(wheel.namelist())
    for expected in ("handoff/workflows/chain.py", "handoff/activities/hop.py", "handoff/workers/main.py",
                     "handoff/examples/analyzer.py", "handoff/examples/samples/inventory_service.py"):
        assert expected in names


def test_the_openai_agents_sdk_installs_beside_handoff(tmp_path):
    """`agents` is the OpenAI Agents SDK's import name; handoff leaves it alone."""
    probe = ("import agents, handoff, handoff.examples, handoff.workflows.chain; "
             "print(agents.__file__); print(agents.Agent.__module__, agents.Runner.__name__); "
             "print(len(handoff.examples.ALL_AGENTS))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    location, kinds, count = done.stdout.split("\n")[:3]
    assert Path(location).parent.parent.name == "site-packages", location  # not this repository's folder
    assert kinds.startswith("agents.") and kinds.endswith("Runner")
    assert count == "5"


# -- what the README and docs/ show --------------------------------------------------------

DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Dotted `handoff.` names in the documents that are not modules or attributes: the hop activity,
# the chain task queue, the resolve activity and the storage driver's type.
NOT_CODE = {"handoff.hop", "handoff.chains", "handoff.resolve_candidates", "handoff.resolve_directory", "handoff.filesystem", "handoff.yaml"}


def documented_imports() -> set[str]:
    """Every `from handoff... import a, b` line the README and docs/ show."""
    found = set()
    for document in DOCUMENTS:
        for match in re.finditer(r"from (handoff[\w.]*) import ([\w, ]+(?: as \w+)?(?:, [\w ]+)*)",
                                 document.read_text()):
            found.add(f"from {match.group(1)} import {match.group(2).strip()}")
    return found


def documented_names() -> set[str]:
    """Every dotted `handoff.x.y` name the README and docs/ mention, between backticks or after
    `python -m`."""
    found = set()
    for document in DOCUMENTS:
        text = document.read_text()
        found |= set(re.findall(r"`(handoff(?:\.\w+)+)(?:\(\))?`", text))
        found |= set(re.findall(r"python -m (handoff(?:\.\w+)+)", text))
    return found - NOT_CODE


def test_every_import_the_documents_show_works():
    imports = documented_imports()
    assert "from handoff import Agent, AgentCapability, HandoffContext, HandoffResult, PermanentError" in imports
    assert "from handoff.llm import llm_agent" in imports
    for line in sorted(imports):
        exec(line.split(" as ")[0] if " as " in line and "," not in line else line, {})  # noqa: S102


def test_every_module_and_name_the_documents_mention_exists():
    missing = []
    for name in sorted(documented_names()):
        parts = name.split(".")
        for cut in range(len(parts), 0, -1):  # the longest importable prefix, then attributes
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
            except ImportError:
                continue
            try:
                for attr in parts[cut:]:
                    obj = getattr(obj, attr)
            except AttributeError:
                missing.append(name)
            break
        else:
            missing.append(name)
    assert not missing, missing


def test_the_modules_import_no_circle():
    """Within a floor too, no module imports one that imports it back (directly or not): each
    folder reads from the bottom up."""
    files = module_files()
    graph = {name: {i for i in imports_of(path) if i in files and i != name} for name, path in files.items()
             if name != FRONT_DOOR}
    for name in graph:  # a package's __init__ re-exporting its own modules is not a circle
        graph[name] = {i for i in graph[name] if not i.startswith(name + ".")}
    state: dict[str, int] = {}
    circles = []

    def visit(name: str, trail: list[str]) -> None:
        state[name] = 1
        for imported in sorted(graph.get(name, ())):
            if state.get(imported) == 1:
                circles.append(" -> ".join([*trail[trail.index(imported):], imported]))
            elif imported not in state:
                visit(imported, [*trail, imported])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not circles, "\n".join(circles)
