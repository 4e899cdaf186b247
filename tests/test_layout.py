"""The package layout (docs/architecture.md): subpackages in data-flow order, no import
cycles, no module that re-exports another module's names."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "spread_tools"

#: A subpackage may import from its own rank or below (docs/architecture.md).
RANK = {"__init__": 0, "errors": 0, "config": 0, "progress": 0, "model": 1, "io": 2,
        "physics": 3, "structure": 4, "simulate": 5, "refine": 5, "plots": 6, "cli": 7}


def _modules():
    for path in sorted(PKG.rglob("*.py")):
        parts = path.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        yield name, path


def _imports(path, module_level_only):
    tree = ast.parse(path.read_text())
    nodes = tree.body if module_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("spread_tools"):
            assert node.level == 0
            yield node.module, [a.name for a in node.names]


def _stage(module):
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_module_is_in_a_known_stage():
    stages = {_stage(m) for m, _ in _modules()}
    assert stages <= set(RANK), stages - set(RANK)


@pytest.mark.parametrize("module,path", list(_modules()), ids=[m for m, _ in _modules()])
def test_imports_only_go_down_the_data_flow(module, path):
    here = RANK[_stage(module)]
    for target, _ in _imports(path, module_level_only=False):
        assert RANK[_stage(target)] <= here, f"{module} imports {target}"


def test_no_import_cycles_at_module_level():
    known = dict(_modules())
    graph = {}
    for module, path in known.items():
        targets = set()
        for target, names in _imports(path, module_level_only=True):
            for n in names:
                targets.add(f"{target}.{n}" if f"{target}.{n}" in known else target)
        graph[module] = targets & set(known)
    state = {}

    def visit(m, stack):
        state[m] = 1
        for t in graph[m]:
            if t == m or t.startswith(m + "."):
                continue                      # a package importing its own submodules
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack + [t]))
            if t not in state:
                visit(t, stack + [t])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])


@pytest.mark.parametrize("module,path", [(m, p) for m, p in _modules() if p.name != "__init__.py"],
                         ids=[m for m, p in _modules() if p.name != "__init__.py"])
def test_modules_export_only_what_they_define(module, path):
    tree = ast.parse(path.read_text())
    defined = set()
    exported = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                if isinstance(t, ast.Name):
                    defined.add(t.id)
                    if t.id == "__all__":
                        exported = [e.value for e in node.value.elts]
    assert set(exported) <= defined, f"{module} re-exports {sorted(set(exported) - defined)}"


def test_subpackage_public_names_import():
    import importlib
    for module, path in _modules():
        if path.name == "__init__.py" and module != "spread_tools":
            pkg = importlib.import_module(module)
            for name in getattr(pkg, "__all__", []):
                assert hasattr(pkg, name), f"{module}.{name}"


def test_bin_has_one_executable_per_console_script():
    cfg = (PKG.parent / "setup.cfg").read_text()
    block = cfg.split("console_scripts =", 1)[1].split("\n[", 1)[0]
    scripts = [ln.split("=")[0].strip() for ln in block.splitlines() if "=" in ln]
    assert len(scripts) >= 6
    for name in scripts:
        tool = PKG.parent / "bin" / name
        assert tool.is_file(), tool
        assert tool.stat().st_mode & 0o111, f"{tool} is not executable"
        entry = [ln for ln in block.splitlines() if ln.strip().startswith(name + " ")][0]
        module = entry.split("=")[1].strip().split(":")[0]
        assert module in tool.read_text(), f"{tool} does not run {module}"
