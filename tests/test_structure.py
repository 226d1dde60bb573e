"""The package's modules form no import cycle (lazy imports inside functions included): each shared piece has
one home, and a module can be read without the ones that import it."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "sd_plugin"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sd_plugin") and node.level == 0:
                candidates = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
                targets |= {next(c for c in candidates if c in modules)} if any(c in modules for c in candidates) else set()
            elif isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names if alias.name in modules}
        # A package's __init__ importing its own submodules is not a cycle through them.
        graph[name] = {t for t in targets if t != name and not t.startswith(name + ".")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(node, trail):
        state[node] = 1
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return trail[trail.index(target):] + [target] if target in trail else [node, target]
            if target not in state:
                found = visit(target, trail + [target])
                if found:
                    return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def test_no_import_cycle_between_modules():
    graph = import_graph()
    assert "sd_plugin.merge_check" in graph and "sd_plugin.adapter_weights" in graph["sd_plugin.merge_check"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
