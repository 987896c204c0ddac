"""The package's layering, checked from its source (docs/architecture.md draws it).

1. Imports go only downward: each module sits in a layer (by its folder), and a module-level or
   function-level import of a package module must name a lower layer, or the same folder.
2. No cycles between modules.
3. Function-local imports of package modules (and of heavy libraries) only where they defer a
   heavy dependency: the imported module loads torch, diffusers, transformers, peft, ray or
   pyarrow at import time while the importing module does not (so `dreamblend --help`, argument
   parsing and the HTTP ingress stay light). Anything else belongs at the top of the module.
4. Production code never imports the embedded toy world.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

import dreamblend_ray

PACKAGE = Path(dreamblend_ray.__file__).parent
HEAVY = {"torch", "diffusers", "transformers", "peft", "ray", "pyarrow", "accelerate", "safetensors"}

# Bottom to top. A module's layer is that of its longest matching prefix.
LAYERS = [
    ("observability",),  # request context, log formats, the metric catalog: standard library only at import
    ("__init__", "dtypes", "runtime", "io", "method.guidance"),  # no package imports (guidance: pure maths)
    ("config",),
    ("models",),
    ("method",),
    ("training",),
    ("evaluation",),
    ("jobs",), ("lifecycle",), ("serving",),
    ("embedded",),  # the toy world: its model, metrics, scorer; may use everything below
    ("demo_record",),  # the demo's recorded figures and their tolerance (numpy only)
    ("demo", "serve_entry", "job_entry"),  # applications and the entry import paths of deployed configs
    ("commands", "cli"),  # the `dreamblend` command
]
PRODUCTION_PREFIXES = ("config", "models", "method", "training", "evaluation", "jobs", "serving", "io")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py") if "weights" not in p.parts}


def layer_of(name: str) -> tuple[int, str]:
    best = (-1, "", -1)
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best[2]:
                best = (index, prefix, len(prefix))
    assert best[0] >= 0, f"module {name} is in no layer: add its folder to LAYERS"
    return best[0], best[1]


def resolve(node: ast.ImportFrom | ast.Import) -> list[str]:
    """Package modules (relative to the package) or third-party roots an import statement names."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif node.level:
        raise AssertionError("relative imports are not used in this package")
    else:
        base = node.module or ""
        names = [f"{base}.{a.name}" if f"{base}.{a.name}".removeprefix("dreamblend_ray.") in MODULES else base
                 for a in node.names]
    out = []
    for name in names:
        if name == "dreamblend_ray" or name.startswith("dreamblend_ray."):
            out.append(name.removeprefix("dreamblend_ray").lstrip(".") or "__init__")
        else:
            out.append("ext:" + name.split(".")[0])
    return out


@cache
def imports(name: str) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(module-level, function-level) imports of a module, each as (target, line)."""
    tree = ast.parse(MODULES[name].read_text())
    top, local = [], []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for sub in ast.walk(node):
                if isinstance(sub, (ast.Import, ast.ImportFrom)):
                    local += [(t, sub.lineno) for t in resolve(sub)]
    local_lines = {line for _, line in local}
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and node.lineno not in local_lines:
            top += [(t, node.lineno) for t in resolve(node)]
    return top, local


@cache
def heavy(name: str, seen: frozenset = frozenset()) -> frozenset:
    """The heavy libraries importing the module loads (through its module-level imports)."""
    found = set()
    for target, _ in imports(name)[0]:
        if target.startswith("ext:"):
            found |= {target[4:]} & HEAVY
        elif target not in seen and target != name:
            found |= heavy(target, seen | {name})
    return frozenset(found)


def deferred(target: str) -> frozenset:
    """What a function-local import of ``target`` loads when it runs."""
    return frozenset({target[4:]} & HEAVY) if target.startswith("ext:") else heavy(target)


def package_imports():
    for name in MODULES:
        top, local = imports(name)
        for target, line in top + local:
            if not target.startswith("ext:"):
                yield name, target, line


def test_every_module_has_a_layer():
    for name in MODULES:
        layer_of(name)


def test_imports_go_only_downward():
    wrong = []
    for name, target, line in package_imports():
        (mine, my_prefix), (theirs, their_prefix) = layer_of(name), layer_of(target)
        if theirs > mine or (theirs == mine and my_prefix != their_prefix):
            wrong.append(f"{name}:{line} imports {target} (layer {theirs} '{their_prefix}' from layer {mine} "
                         f"'{my_prefix}')")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for name, target, _ in package_imports():
        if target in graph and target != name:
            graph[name].add(target)
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_function_local_imports_only_defer_heavy_dependencies():
    pointless = []
    for name in MODULES:
        for target, line in imports(name)[1]:
            if target.startswith("ext:") and target[4:] not in HEAVY:
                continue  # a light standard-library import placed near its only use
            if not deferred(target) - heavy(name):
                pointless.append(f"{name}:{line} imports {target} inside a function, which defers nothing: "
                                 f"{name} already loads {sorted(heavy(name)) or 'no heavy library'} and "
                                 f"{target} loads {sorted(deferred(target)) or 'none'}")
    assert not pointless, "\n".join(pointless)


def test_production_code_never_imports_the_embedded_world():
    wrong = [f"{name}:{line} imports {target}" for name, target, line in package_imports()
             if name.startswith(PRODUCTION_PREFIXES) and target.startswith("embedded")]
    assert not wrong, "\n".join(wrong)


def test_the_checker_sees_a_known_import():
    # guards the checks above against passing because the parser found nothing
    assert ("config", ) and any(t == "config" for t, _ in imports("method.sampler")[0])
    assert "torch" in heavy("method.sampler") and not heavy("config")
