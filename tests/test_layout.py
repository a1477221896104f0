"""The package's layout: its modules form a one-way stack."""
from __future__ import annotations

import ast
from helpers import ROOT  # noqa: F401


# -- moved from test_first_contact (issues #11, #16) -------------------------------------------------


def _import_graph() -> dict[str, set[str]]:
    """vlmoe module -> vlmoe modules it imports (anywhere in the file, lazy imports too)."""
    pkg = ROOT / "vlmoe"
    mods = {}
    for f in pkg.rglob("*.py"):
        parts = list(f.relative_to(ROOT).with_suffix("").parts)
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = (f, parts[-1] == "__init__")
    graph = {}
    for name, (f, is_pkg) in mods.items():
        base = name.split(".") if is_pkg else name.split(".")[:-1]
        out = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    target = base[: len(base) - node.level + 1] + (node.module.split(".") if node.module else [])
                else:
                    target = (node.module or "").split(".")
                t = ".".join(target)
                for alias in node.names:
                    sub = f"{t}.{alias.name}"
                    out.add(sub if sub in mods else t)
            elif isinstance(node, ast.Import):
                out.update(a.name for a in node.names)
        graph[name] = {t for t in out if t in mods and t != name}
    return graph


def test_modules_form_a_one_way_stack():
    """Defect 8: factory <-> upcycle and moe.layer <-> moe.parallel imported each other.
    A package's __init__ re-exporting its own submodules is not a cycle."""
    graph = _import_graph()

    def reach(a, b, seen=()):
        return any(n == b or (n not in seen and reach(n, b, (*seen, n))) for n in graph[a] if not b.startswith(n + "."))

    cycles = [(a, b) for a in graph for b in graph[a] if not a.startswith(b + ".") and reach(b, a) and not b.startswith(a + ".")]
    assert not cycles, cycles
    assert "vlmoe.moe.parallel" not in graph["vlmoe.moe.layer"] and "vlmoe.models.upcycle" not in graph["vlmoe.models.factory"]
