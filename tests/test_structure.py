"""The package's imports run one way: config -> parallel, diffusion -> model -> checkpoint -> data
-> training, inference -> cli -> commands (docs/DESIGN.md, "Layers of the code"). Parsed from the source,
so a new import against that direction fails here, not in a reviewer's head."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "megablock"

# A package may import its own modules and those of strictly lower tiers only (so two packages of
# one tier, such as training and inference, never import each other).
TIERS = {
    "config": 0,
    "parallel": 1, "diffusion": 1,
    "model": 2,
    "checkpoint": 3,
    "data": 4,
    "training": 5, "inference": 5,
    "cli": 6,
    "commands": 7,
    "testing": 8,  # fixtures for tests and benchmarks: nothing in the package imports it
}


def _modules():
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield path, ".".join(parts)


def _imports(path: Path, module: str):
    """(line, imported megablock module, inside a function?, the source line) of every import."""
    tree = ast.parse(path.read_text())
    is_package = path.name == "__init__.py"
    lines = path.read_text().splitlines()
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    nested = {id(n) for f in functions for n in ast.walk(f) if n is not f}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [target]
        else:
            continue
        for name in names:
            if name == "megablock" or name.startswith("megablock."):
                yield node.lineno, name, id(node) in nested, lines[node.lineno - 1]


def _tier(module: str):
    parts = module.split(".")
    return (parts[1], TIERS[parts[1]]) if len(parts) > 1 else (None, None)


def test_every_package_has_a_tier():
    missing = {m.split(".")[1] for _, m in _modules() if m.count(".") >= 1} - set(TIERS)
    assert not missing, f"add {sorted(missing)} to TIERS (and the table in docs/DESIGN.md)"


@pytest.mark.parametrize("path,module", list(_modules()), ids=lambda x: str(x) if isinstance(x, str) else "")
def test_imports_run_one_way(path, module):
    package, tier = _tier(module)
    if package is None:
        return
    wrong = []
    for line, target, _, _ in _imports(path, module):
        other, other_tier = _tier(target)
        if other is None or other == package:
            continue
        if other_tier >= tier:
            wrong.append(f"line {line}: {module} (tier {tier}) imports {target} (tier {other_tier})")
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_no_in_function_imports_of_own_modules_without_a_reason():
    """A function-level import of megablock's own code is either a cycle being dodged or a heavy
    dependency being deferred; only the second is allowed, and it says so."""
    hidden = []
    for path, module in _modules():
        for line, target, in_function, text in _imports(path, module):
            if in_function and "deferred:" not in text:
                hidden.append(f"{path.relative_to(ROOT.parent)}:{line}: {text.strip()}")
    assert not hidden, "in-function imports of megablock modules:\n" + "\n".join(hidden)


def test_the_checker_sees_a_wrong_import(tmp_path):
    """The rule itself: a model module importing the trainer is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("import torch\n\ndef f():\n    from megablock.training.trainer import Trainer\n")
    found = list(_imports(bad, "megablock.model.bad"))
    assert found == [(4, "megablock.training.trainer", True, "    from megablock.training.trainer import Trainer")]
    assert _tier(found[0][1])[1] > _tier("megablock.model.bad")[1]
