"""The package's layout, read from its source: who may import whom (README, "How the code is organised").

Every import statement of every module (also those inside functions, which run later but are imports all the
same) is read with ``ast``, without importing anything, and resolved to a module of this project:

* the KA library (the ``nnunetv2_allukan`` root and any subpackage that is not one of the wings below) imports
  only itself: neither nnU-Net nor the architectures, trainers, data builders or tools;
* the architectures do not import the trainers;
* only the tools import the tools (the one exception: the ``python -m nnunetv2_allukan.bench_layers`` shim the
  README documents), and nothing imports the CLI module, which sits on top;
* there are no import circles;
* a module over 400 lines says why at its top (a docstring line starting with ``Size:``);
* every package folder is listed in pyproject.toml (a wheel ships only the listed ones).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Where each installed package's files are (pyproject.toml's package-dir).
PACKAGE_DIRS = {"nnunetv2_allukan": ROOT / "nnunetv2_allukan",
                "nnunetv2_allukan.architectures": ROOT / "architectures",
                "nnunetv2_allukan.trainers": ROOT / "trainers"}
ARCHITECTURES, TRAINERS = "nnunetv2_allukan.architectures", "nnunetv2_allukan.trainers"
DATA, TOOLS, CLI = "nnunetv2_allukan.data", "nnunetv2_allukan.tools", "nnunetv2_allukan.tools.cli"
# nnU-Net's discovery folder: nnU-Net imports its modules by their own names; they re-export the trainers.
DISCOVERY = "nnunetv2_allukan.nnunet_ext_trainers"
WINGS = (ARCHITECTURES, TRAINERS, DATA, TOOLS, DISCOVERY)
NNUNET = ("nnunetv2", "dynamic_network_architectures", "batchgenerators", "acvl_utils")
# Documented compatibility paths in the KA library's folder that hand over to a tool.
SHIMS = {"nnunetv2_allukan.bench_layers": "nnunetv2_allukan.tools.bench_layers"}
MAX_LINES = 400


def _modules() -> dict:
    """{module name: (path, is package)} for every .py file of the installed packages."""
    modules = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if "__pycache__" in parts:
                continue
            if package == "nnunetv2_allukan" and parts[0] in ("architectures", "trainers"):
                continue  # not there today; would be a second copy of a mapped package
            is_package = parts[-1] == "__init__"
            name = ".".join((package, *(parts[:-1] if is_package else parts)))
            modules[name] = (path, is_package)
    return modules


MODULES = _modules()


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _imports(name: str) -> list:
    """[(line, absolute module name)] of every import in a module, relative ones resolved.

    ``from a import b`` yields ``a.b`` when that is a module of ours, else ``a``. A string passed to
    ``runpy.run_module`` counts as an import (it is one, run as a script).
    """
    path, is_package = MODULES[name]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = name.split(".") if is_package else name.split(".")[:-1]
                package = package[:len(package) - (node.level - 1)]
                base = ".".join(package + ([node.module] if node.module else []))
            else:
                base = node.module
            # ``from package import submodule`` imports the submodule (the package only as its parent).
            found += [(node.lineno, f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base) for a in node.names]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "run_module"
              and node.args and isinstance(node.args[0], ast.Constant)):
            found.append((node.lineno, node.args[0].value))
    return found


IMPORTS = {name: _imports(name) for name in MODULES}


def _ours(target: str) -> bool:
    return _in(target, "nnunetv2_allukan")


def _violations(modules, forbidden) -> list:
    return [f"{MODULES[m][0].relative_to(ROOT)}:{line} imports {target}"
            for m in modules for line, target in IMPORTS[m] if forbidden(m, target)]


def _is_core(module: str) -> bool:
    return not any(_in(module, wing) for wing in WINGS) and module not in SHIMS


def test_the_walk_sees_every_part_of_the_package():
    assert {"nnunetv2_allukan", "nnunetv2_allukan.layers", CLI, ARCHITECTURES, TRAINERS, DATA} <= set(MODULES)
    assert ("nnunetv2_allukan.tools.nnunet_commands" in {t for _, t in IMPORTS[CLI]}), "relative imports resolved"


def test_every_import_of_ours_names_a_module_that_exists():
    # a lazy import inside a function with one dot too few fails only when that function runs
    assert _violations(MODULES, lambda m, t: _ours(t) and t not in MODULES) == []


def test_the_ka_library_imports_neither_nnunet_nor_the_wings():
    core = [m for m in MODULES if _is_core(m)]
    assert {"nnunetv2_allukan", "nnunetv2_allukan.spline", "nnunetv2_allukan.layers"} <= set(core)
    assert _violations(core, lambda m, t: t.split(".")[0] in NNUNET or (_ours(t) and not _is_core(t))) == []


def test_architectures_do_not_import_trainers():
    architectures = [m for m in MODULES if _in(m, ARCHITECTURES)]
    assert _violations(architectures, lambda m, t: _in(t, TRAINERS)) == []


def test_only_the_tools_import_the_tools():
    outside = [m for m in MODULES if not _in(m, TOOLS)]
    assert _violations(outside, lambda m, t: _in(t, TOOLS) and SHIMS.get(m) != t) == []


def test_nothing_imports_the_cli():
    assert _violations(MODULES, lambda m, t: t == CLI and m != CLI) == []


def test_no_import_circles():
    graph = {m: sorted({t for _, t in IMPORTS[m] if t in MODULES and t != m}) for m in MODULES}
    cycles, state = [], {}  # state: 1 on the current path, 2 finished

    def visit(module, path):
        state[module] = 1
        for target in graph[module]:
            if state.get(target) == 1:
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in graph:
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_long_modules_say_why_at_their_top():
    unexplained = []
    for name, (path, _) in MODULES.items():
        text = path.read_text()
        doc = ast.get_docstring(ast.parse(text)) or ""
        if len(text.splitlines()) > MAX_LINES and not any(l.startswith("Size:") for l in doc.splitlines()):
            unexplained.append(f"{path.relative_to(ROOT)}: {len(text.splitlines())} lines")
    assert unexplained == []


def test_every_package_folder_is_listed_in_pyproject():
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert {k: str(ROOT / v) for k, v in setuptools["package-dir"].items()} == \
        {k: str(v) for k, v in PACKAGE_DIRS.items()}
    packages = {m for m, (_, is_package) in MODULES.items() if is_package}
    assert sorted(packages - set(setuptools["packages"])) == []
