"""The line between the core and the shell (docs/ARCHITECTURE.md), checked on the
source: the core decides and is driven by its callers and an injected clock; only
the shell imports the reactor or touches the process and the host (fast tier)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "emojistream"

#: What a message meets on its way, and what decides about it.
CORE = ("vocabulary", "sse", "hub", "summarizer", "router", "replay", "delays",
        "stream", "subscription", "batching", "status", "rankings", "slices", "waiting",
        "cache", "timers", "history")
#: Modules that reach the process or the host (or whose only use is to).
PROCESS_MODULES = {"os", "sys", "signal", "resource", "gc", "socket", "subprocess",
                   "atexit", "ctypes", "tempfile", "shutil", "threading", "select",
                   "multiprocessing", "platform"}
#: Twisted modules that stand for the running reactor or its real I/O.
TWISTED_SHELL = ("twisted.internet.reactor", "twisted.internet.tcp",
                 "twisted.internet.process", "twisted.internet.endpoints",
                 "twisted.internet.ssl", "twisted.internet.unix", "twisted.application.app",
                 "twisted.scripts")


def _type_checking_only(tree: ast.Module) -> set[ast.AST]:
    """The nodes under C{if TYPE_CHECKING:}: names for the type checker, never run."""
    return {inner for node in ast.walk(tree)
            if isinstance(node, ast.If) and isinstance(node.test, ast.Name)
            and node.test.id == "TYPE_CHECKING"
            for outer in node.body for inner in ast.walk(outer)}


def imports_of(module: str) -> set[str]:
    """Every module C{module} imports when it runs (C{from a import b} counts as a and
    a.b; imports for the type checker alone do not count)."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    skipped = _type_checking_only(tree)
    found: set[str] = set()
    for node in ast.walk(tree):
        if node in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def present(module: str) -> bool:
    return (PACKAGE / f"{module}.py").exists()


@pytest.mark.parametrize("module", [m for m in CORE if present(m)])
def test_the_core_imports_no_reactor_and_nothing_of_the_process(module: str) -> None:
    imported = imports_of(module)
    process = {m for m in imported if m.split(".")[0] in PROCESS_MODULES}
    reactor = {m for m in imported if m.startswith(TWISTED_SHELL)}
    assert not process, f"{module} imports the process: {sorted(process)}"
    assert not reactor, f"{module} imports the reactor or real I/O: {sorted(reactor)}"


@pytest.mark.parametrize("module", [m for m in CORE if present(m)])
def test_the_core_imports_only_the_core(module: str) -> None:
    own = {m.split(".")[1] for m in imports_of(module)
           if m.startswith("emojistream.") and present(m.split(".")[1])}
    assert own <= set(CORE), f"{module} imports the shell: {sorted(own - set(CORE))}"


def test_the_checks_see_a_violation() -> None:
    """The checks read what they claim to: a module of the shell fails them."""
    assert "signal" in imports_of("lifecycle")
    assert "twisted.internet.endpoints" in {m for m in imports_of("service")
                                            if m.startswith(TWISTED_SHELL)}
