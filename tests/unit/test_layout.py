"""The code layout: one room per role, imports that say where things live (README "Layout").

* ``common`` holds what both the server and the sites import: it imports no other room;
* ``server`` and ``client`` never import each other (nor the tools above them);
* no import cycles, no private name imported from another module, imports at module top unless a
  comment says why.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ROOMS = ("common", "server", "client", "deploy", "synth", "fedglioma")
#: room -> rooms it must never import
FORBIDDEN = {
    "common": {"server", "client", "deploy", "synth", "fedglioma"},
    "server": {"client", "deploy", "synth", "fedglioma"},
    "client": {"server", "deploy", "synth", "fedglioma"},
    "synth": {"server", "client", "deploy", "fedglioma"},
    "deploy": {"fedglioma"},
}


def modules() -> dict[str, Path]:
    found = {}
    for room in ROOMS:
        for path in sorted((ROOT / room).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = modules()


def project_imports(path: Path) -> list[tuple[ast.stmt, str, list[str]]]:
    """(node, imported module, imported names) for each import of a project module in ``path``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in ROOMS:
                    out.append((node, alias.name, []))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] in ROOMS:
                out.append((node, node.module, [a.name for a in node.names]))
    return out


def resolve(module: str, names: list[str]) -> set[str]:
    """The project modules an import statement loads (``from pkg import submodule`` included)."""
    targets = {module} if module in MODULES else set()
    targets |= {f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES}
    return targets


def test_the_layout_has_every_room_and_the_scan_sees_them() -> None:
    assert {m.split(".")[0] for m in MODULES} == set(ROOMS)
    assert {"common.model.network", "common.data.site", "server.strategy", "client.session"} <= set(MODULES)


@pytest.mark.parametrize("room", sorted(FORBIDDEN))
def test_rooms_import_only_what_they_may(room: str) -> None:
    bad = []
    for name, path in MODULES.items():
        if name.split(".")[0] != room:
            continue
        for node, module, _ in project_imports(path):
            if module.split(".")[0] in FORBIDDEN[room]:
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {module}")
    assert not bad, "\n".join(bad)


def test_no_import_cycles() -> None:
    graph = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        for _, module, names in project_imports(path):
            graph[name] |= resolve(module, names) - {name}
    # A package's __init__ may re-export its own submodules; any other edge counts.
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if nxt.startswith(node + "."):
                continue  # package __init__ -> its own submodule (re-export)
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, cycles


def test_no_private_name_is_imported_from_another_module() -> None:
    bad = [
        f"{path.relative_to(ROOT)}:{node.lineno} imports {module}.{n}"
        for path in MODULES.values()
        for node, module, names in project_imports(path)
        for n in names
        if n.startswith("_")
    ]
    assert not bad, "\n".join(bad)


def test_imports_sit_at_module_top_unless_a_comment_says_why() -> None:
    bad = []
    for path in MODULES.values():
        lines = path.read_text().splitlines()
        tree = ast.parse(path.read_text())
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)) or id(node) in top:
                continue
            if isinstance(node, ast.ImportFrom) and node.module == "__future__":
                continue
            row = node.lineno - 1
            while row > 0 and lines[row - 1].strip().startswith(("import ", "from ")) and "#" not in lines[row]:
                row -= 1  # the comment may stand above a block of imports
            if "#" in lines[node.lineno - 1] or lines[row - 1].strip().startswith("#"):
                continue
            bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert not bad, "imports inside functions without a comment saying why:\n" + "\n".join(bad)
