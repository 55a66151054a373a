"""Import structure: building a Config never pulls in the dataset preparation (downloads happen on first
use, in create_dataset), and no module of the package closes an import cycle: the key modules import first in
a fresh interpreter, and no import, even one inside a function, closes a loop.

The cycle check reads ``import`` statements with the stdlib ``ast`` (Tarjan's strongly connected components
below): pylint's cyclic-import or import-linter would each bring a large dependency (and a configuration) for
what is some 60 lines here, and this check also counts function-level imports."""

from __future__ import annotations

import ast
import subprocess
import sys

from tests.tiny import REPO_ROOT

PACKAGE = "recbole_perpeft"
# The modules whose imports must stay circle-free (with every module of recbole_perpeft.data).
KEY_MODULES = ["config", "utils", "property_files", "compare", "compare_report"]


def run_python(code: str, cwd) -> str:
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def test_config_neither_imports_nor_runs_the_dataset_preparation(tmp_path):
    code = f"""
import os, sys
import recbole_perpeft.config as config
assert "recbole_perpeft.data.prepare" not in sys.modules, "importing config imported data.prepare"
data = {str(tmp_path / "data")!r}
# download=False: were Config to prepare the dataset again, it would fail here, not reach the network.
built = config.Config(model="SASRec", dataset="amazon-arts", config_dict={{"data_path": data, "download": False}})
assert built["data_path"] == os.path.join(data, "amazon-arts"), built["data_path"]
for name in ("recbole_perpeft.data.prepare", "recbole_perpeft.data.amazon_download"):
    assert name not in sys.modules, "building a Config imported " + name
assert not os.path.exists(data), "building a Config wrote " + data
"""
    run_python(code, cwd=REPO_ROOT)


def package_modules() -> dict[str, object]:
    """Every module of the package: dotted name -> path."""
    root = REPO_ROOT / PACKAGE
    modules = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(REPO_ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    return modules


def key_modules(modules) -> list[str]:
    data = sorted(m for m in modules if m == f"{PACKAGE}.data" or m.startswith(f"{PACKAGE}.data."))
    return [f"{PACKAGE}.{m}" for m in KEY_MODULES] + data


def test_each_key_module_imports_first_in_a_fresh_interpreter():
    """A circle shows as an ImportError ("partially initialized module") when one of its modules is imported
    first: import each first, after forgetting every module of ours (torch, RecBole stay loaded: fast)."""
    names = key_modules(package_modules())
    code = f"""
import importlib, sys
for name in {names!r}:
    for loaded in [m for m in sys.modules if m == "{PACKAGE}" or m.startswith("{PACKAGE}.")]:
        del sys.modules[loaded]
    importlib.import_module(name)
print("ok")
"""
    assert run_python(code, cwd=REPO_ROOT).strip() == "ok"


def imports_of(name: str, path, modules) -> set[str]:
    """The package modules ``name`` imports anywhere in its file (function-level imports too), with the
    packages a submodule import initialises. ``name``'s own parent packages initialise before it, so they count
    only where named in ``from <parent> import x``: that reads the half-initialised parent (the
    ``recbole_perpeft.data`` <-> ``data.dataset`` cycle), where ``from <parent>.x import y`` would not."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found, named = set(), set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import: from the package, up level - 1 packages
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            named.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    edges = set()
    for target in found:
        parts = target.split(".")
        for i in range(1, len(parts) + 1):
            module = ".".join(parts[:i])
            parent = name.startswith(module + ".")
            if module in modules and module != name and (not parent or module == target and module in named):
                edges.add(module)
    return edges


def circles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(component)
    return found


def test_no_import_cycle_among_the_package_modules():
    modules = package_modules()
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    assert len(graph) > 50 and graph[f"{PACKAGE}.data"], "the package's modules were not all read"
    offending = [sorted(c) for c in circles(graph)]
    assert not offending, f"import cycles (break each, e.g. import the submodule, not its package): {offending}"


def test_the_cycle_check_counts_a_read_of_the_half_initialised_parent_package(tmp_path):
    """``from pkg import checks`` in pkg/dataset.py while pkg/__init__.py imports pkg.dataset is a cycle;
    ``import pkg.checks as checks`` is not (pkg initialises first either way)."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("from pkg.dataset import Dataset\n")
    (package / "checks.py").write_text("")
    (package / "dataset.py").write_text("from pkg import checks\nclass Dataset: ...\n")
    files = {"pkg": "__init__.py", "pkg.checks": "checks.py", "pkg.dataset": "dataset.py"}
    modules = {name: package / file for name, file in files.items()}
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    assert graph["pkg.dataset"] == {"pkg", "pkg.checks"} and circles(graph) == [{"pkg", "pkg.dataset"}]
    (package / "dataset.py").write_text("import pkg.checks as checks\nfrom pkg.checks import x\nclass Dataset: ...\n")
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    assert graph["pkg.dataset"] == {"pkg.checks"} and circles(graph) == []


def test_the_circle_finder_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]
    assert circles({"a": {"b"}, "b": set()}) == []
