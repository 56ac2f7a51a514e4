"""The package's import graph has no cycle, and no import inside a function hides one (no torch, no model).

A function-local import of a logitguard module that imports, directly or not, the importing module is a cycle
worked around at run time: it was how config.py and models.py shared ConfigError before errors.py held it."""

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "logitguard"
# read on attribute access only: the deprecated alias losses.REGULARIZERS of the registry in logitguard.regularizers
ALLOWED = {("logitguard.losses", "logitguard.regularizers")}


def module_name(path: Path) -> str:
    parts = ["logitguard", *path.relative_to(SRC).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in SRC.rglob("*.py")}


def imported(node: ast.AST, name: str, is_package: bool) -> set[str]:
    """The logitguard modules an import statement loads (`from . import x` loads the submodule x)."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name in MODULES}
    if not isinstance(node, ast.ImportFrom):
        return set()
    if node.level:
        base = name.split(".") if is_package else name.split(".")[:-1]
        module = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
    else:
        module = node.module or ""
    submodules = {f"{module}.{a.name}" for a in node.names if f"{module}.{a.name}" in MODULES}
    names = [a for a in node.names if f"{module}.{a.name}" not in MODULES]
    return submodules | ({module} if names and module in MODULES else set())


def graphs() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(module -> what it imports at its top level, module -> what it imports inside functions only)."""
    top, inner = {}, {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        is_package = path.name == "__init__.py"
        top[name] = set().union(*(imported(n, name, is_package) for n in tree.body)) - {name}
        every = set().union(*(imported(n, name, is_package) for n in ast.walk(tree))) - {name}
        inner[name] = every - top[name]
    return top, inner


def reaches(top: dict[str, set[str]], start: str, goal: str) -> bool:
    seen, todo = set(), [start]
    while todo:
        here = todo.pop()
        if here == goal:
            return True
        if here not in seen:
            seen.add(here)
            todo.extend(top.get(here, ()))
    return False


def hidden_cycles(top: dict[str, set[str]], inner: dict[str, set[str]]) -> set[tuple[str, str]]:
    return {(a, b) for a in inner for b in inner[a] if reaches(top, b, a)}


def test_no_import_cycle_at_module_level():
    top, _ = graphs()
    cycles = [(a, b) for a in top for b in top[a] if reaches(top, b, a)]
    assert not cycles, cycles


def test_no_function_local_import_hides_a_cycle():
    top, inner = graphs()
    hidden = hidden_cycles(top, inner) - ALLOWED
    assert not hidden, sorted(hidden)


def test_the_checker_sees_a_hidden_cycle():
    """The layout before errors.py held ConfigError: config imported models at the top, models config in a function."""
    top = {"logitguard.config": {"logitguard.errors", "logitguard.models"}, "logitguard.models": set()}
    inner = {"logitguard.models": {"logitguard.config"}, "logitguard.config": set()}
    assert hidden_cycles(top, inner) == {("logitguard.models", "logitguard.config")}


# a comparison of a method or regularizer setting with a name: the registries answer such questions instead
NAME_BRANCH = re.compile(r"\b(method|regularizer)\s*(==|!=|\bin\b|\bnot in\b)\s*[\(\[\{\"']")
REGISTRIES = ("adapters.py", "regularizers/", "methods/")


def test_no_branch_on_a_method_or_regularizer_name_outside_the_registries():
    found = []
    for path in SRC.rglob("*.py"):
        where = path.relative_to(SRC).as_posix()
        if where.startswith(REGISTRIES):
            continue
        lines = enumerate(path.read_text().splitlines(), 1)
        found += [f"{where}:{i}" for i, line in lines if NAME_BRANCH.search(line)]
    assert not found, found
    assert NAME_BRANCH.search('if cfg.method == "full":') and NAME_BRANCH.search("if regularizer in ('str', 'kl'):")


def test_old_import_paths_still_work_and_say_where_to_go():
    """logitguard.eval.cli and logitguard.bench_cli moved (cli/, eval/prompts.py): kept one release, with a warning."""
    import importlib
    import sys
    import warnings

    for name in ("logitguard.eval.cli", "logitguard.bench_cli", "logitguard.cli.bench"):
        sys.modules.pop(name, None)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            module = importlib.import_module(name)
        assert callable(module.register) and any(issubclass(w.category, DeprecationWarning) for w in caught)
    from logitguard.eval.cli import read_prompts
    from logitguard.eval.prompts import read_prompts as moved

    assert read_prompts is moved
