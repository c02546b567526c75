"""The package's floor plan: layers import only downward, no cycles, no private imports.

Layers, lowest first: aopsam_jax.sam (the SAM port), aopsam_jax.aop (the AoP
method), aopsam_jax.data, aopsam_jax.trainer, then the apps at the top level
(aopsam_jax.segment, .train, .evaluate, ...).  Read with `ast`, so the check
sees lazy imports inside functions too.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "aopsam_jax"
LAYERS = {"sam": 0, "aop": 1, "data": 2, "trainer": 3}
APP_LAYER = 4


def module_name(path: pathlib.Path) -> str:
  rel = path.relative_to(ROOT.parent).with_suffix("")
  parts = list(rel.parts)
  if parts[-1] == "__init__":
    parts = parts[:-1]
  return ".".join(parts)


def layer_of(mod: str) -> int:
  parts = mod.split(".")
  if len(parts) >= 2 and parts[1] in LAYERS:
    return LAYERS[parts[1]]
  return APP_LAYER


def package_of(mod: str, is_pkg: bool) -> str:
  return mod if is_pkg else mod.rpartition(".")[0]


def imports(path: pathlib.Path):
  """(imported module, [names]) for every import of aopsam_jax code in `path`."""
  mod = module_name(path)
  pkg = package_of(mod, path.name == "__init__.py")
  tree = ast.parse(path.read_text(), str(path))
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for a in node.names:
        if a.name.startswith("aopsam_jax"):
          yield a.name, []
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        anchor = pkg.split(".")
        anchor = anchor[:len(anchor) - (node.level - 1)]
        base = ".".join(anchor + ([base] if base else []))
      if not base.startswith("aopsam_jax"):
        continue
      names = [a.name for a in node.names]
      yield base, names


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}


def resolve(base: str, name: str) -> str:
  """`from base import name`: the module meant when `name` is a submodule."""
  return f"{base}.{name}" if f"{base}.{name}" in MODULES else base


def edges():
  for mod, path in sorted(MODULES.items()):
    for base, names in imports(path):
      targets = [resolve(base, n) for n in names] or [base]
      for t, n in zip(targets, names or [None]):
        yield mod, t, n


def test_layers_import_only_downward():
  bad = [f"{m} -> {t}" for m, t, _ in edges()
         if m != "aopsam_jax" and layer_of(t) > layer_of(m)]
  assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_private_names_across_modules():
  bad = [f"{m} imports {t}.{n}" for m, t, n in edges()
         if n and n.startswith("_") and t != m and not n.startswith("__")]
  assert not bad, "\n".join(bad)


def test_no_import_cycles():
  graph = {}
  for m, t, _ in edges():
    if t != m and t in MODULES and m in MODULES:
      graph.setdefault(m, set()).add(t)
  # a package's __init__ re-exporting its children is not a cycle of logic
  for m in list(graph):
    graph[m] = {t for t in graph[m] if not m.startswith(t + ".")}
  state, cycle = {}, []

  def visit(n, stack):
    state[n] = 1
    for t in sorted(graph.get(n, ())):
      if state.get(t) == 1:
        cycle.append(stack[stack.index(t):] + [t] if t in stack else [n, t])
      elif t not in state:
        visit(t, stack + [t])
    state[n] = 2

  for n in sorted(graph):
    if n not in state:
      visit(n, [n])
  assert not cycle, "import cycles: " + "; ".join(" -> ".join(c) for c in cycle)


@pytest.mark.parametrize("mod,expected", [("aopsam_jax.sam.amg", 0), ("aopsam_jax.aop.asf", 1),
                                          ("aopsam_jax.segment", APP_LAYER)])
def test_layer_table(mod, expected):
  assert mod in MODULES and layer_of(mod) == expected


MAX_FUNCTION_LINES = 80
# Functions allowed over the limit, with the reason.  Empty: keep it so.
LONG_FUNCTION_ALLOW = {}


def test_no_long_functions():
  """No function or method in the library is longer than ~80 lines (a
  function that long does several things: split it)."""
  long = []
  for mod, path in sorted(MODULES.items()):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        n = node.end_lineno - node.lineno + 1
        if n > MAX_FUNCTION_LINES and f"{mod}.{node.name}" not in LONG_FUNCTION_ALLOW:
          long.append(f"{mod}.{node.name}: {n} lines ({path}:{node.lineno})")
  assert not long, "functions over the limit:\n" + "\n".join(long)
