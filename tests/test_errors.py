"""The error tree as the code uses it: every raise names a fix, every translation keeps its cause,
the tree drawn in errors.py is the real one, and `import edgefed` stays light."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import edgefed
from edgefed.errors import EdgefedError

SOURCE = Path(edgefed.__file__).parent


def _all_modules() -> list[str]:
    return [m.name for m in pkgutil.walk_packages(edgefed.__path__, "edgefed.")]


def _error_classes() -> dict[str, type]:
    for name in _all_modules():
        importlib.import_module(name)
    found, todo = {}, [EdgefedError]
    while todo:
        cls = todo.pop()
        found[cls.__name__] = cls
        todo.extend(cls.__subclasses__())
    return found


def _raise_sites():
    for path in sorted(SOURCE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        handlers = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ExceptHandler):
                for inner in ast.walk(node):
                    handlers[id(inner)] = node  # the innermost handler wins (BFS order)
        for node in ast.walk(tree):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                yield path, node, handlers.get(id(node))


def test_every_raised_edgefed_error_names_a_non_empty_fix_and_keeps_its_cause():
    errors = _error_classes()
    missing, dropped = [], []
    for path, node, handler in _raise_sites():
        call = node.exc
        name = getattr(call.func, "id", getattr(call.func, "attr", None))
        if name not in errors:
            continue
        where = f"{path.relative_to(SOURCE)}:{node.lineno}"
        fix = next((k.value for k in call.keywords if k.arg == "fix"), None)
        if fix is None and len(call.args) >= 2:
            fix = call.args[1]
        empty = isinstance(fix, ast.Constant) and not str(fix.value).strip()
        if fix is None or empty:
            missing.append(where)
        if handler is not None and handler.name is not None:
            cause = node.cause
            if not (isinstance(cause, ast.Name) and cause.id == handler.name):
                dropped.append(where)
    assert missing == [], f"errors without a fix: {missing}"
    assert dropped == [], f"translated errors not raised `from` the caught one: {dropped}"


def test_an_error_without_a_fix_cannot_be_made():
    for fix in ("", "  "):
        try:
            EdgefedError("something is wrong", fix)
        except TypeError:
            continue
        raise AssertionError(f"EdgefedError accepted the fix {fix!r}")


def test_the_tree_drawn_in_errors_py_is_the_real_one():
    drawn = edgefed.errors.__doc__
    for name, cls in _error_classes().items():
        if cls is EdgefedError:
            continue
        assert name in drawn, f"{name} is missing from the tree in errors.py"
        parent = cls.__bases__[0].__name__
        assert drawn.index(parent) < drawn.index(name), f"{name} is not drawn under {parent}"


def test_import_edgefed_and_its_public_names_load_no_torch_transformers_or_llama_cpp():
    packages = [
        "edgefed",
        *(m.name for m in pkgutil.iter_modules(edgefed.__path__, "edgefed.") if m.ispkg),
    ]
    code = (
        "import importlib, sys\n"
        f"for name in {packages!r}:\n"
        "    module = importlib.import_module(name)\n"
        "    for public in module.__all__:\n"
        "        getattr(module, public)\n"
        "heavy = sorted({'torch', 'transformers', 'llama_cpp', 'peft', 'bitsandbytes'}"
        " & set(sys.modules))\n"
        "print(','.join(heavy))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"heavy modules loaded: {done.stdout.strip()}"
    for name in packages:
        module = importlib.import_module(name)
        assert module.__all__ and all(hasattr(module, n) for n in module.__all__), name
