"""The package's imports run one way: no module imports, directly or
through others, a module that imports it -- counting lazy imports inside
functions and type-only (``TYPE_CHECKING``) ones too."""

import ast
import os

import vdsm_blockops

PACKAGE = os.path.dirname(vdsm_blockops.__file__)


def module_names():
    names = {}
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                rel = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
                names[rel.removesuffix(".__init__")] = path
    return names


def imports_of(name, path, known):
    """Every module of the package ``name`` imports, wherever the import
    statement stands. ``from . import x`` counts as importing ``x``, not
    the package itself."""
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            submodules = [f"{module}.{alias.name}" for alias in node.names]
            found.update(m for m in submodules if m in known)
            if module in known and not any(m in known for m in submodules):
                found.add(module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in known)
    found.discard(name)
    return found


def test_no_module_imports_itself_through_others():
    known = module_names()
    graph = {name: imports_of(name, path, known) for name, path in known.items()}

    def reaches(start):
        seen, todo = set(), list(graph[start])
        while todo:
            module = todo.pop()
            if module not in seen:
                seen.add(module)
                todo.extend(graph[module])
        return seen

    circles = sorted(name for name in graph if name in reaches(name))
    assert circles == [], f"modules in an import circle: {circles}"


def test_the_check_sees_a_circle():
    """The graph builder finds lazy and type-only imports (else the test
    above could never fail)."""
    known = module_names()
    lazy = imports_of("vdsm_blockops.api._node", known["vdsm_blockops.api._node"], known)
    assert "vdsm_blockops.ops.merge" in lazy  # imported inside Node.merge only
    typed = imports_of("vdsm_blockops.engine.copying", known["vdsm_blockops.engine.copying"], known)
    assert "vdsm_blockops.core.relocate_plan" in typed  # under TYPE_CHECKING only


LAYERS = ["core", "virt", "engine", "ops", "api", "shells"]  # bottom up


def test_imports_run_down_the_layers():
    """core (the model) imports nothing above it, virt only core, engine
    no operation or shell, the operations no shell, the public API no shell."""
    known = module_names()
    upward = []
    for name, path in known.items():
        parts = name.split(".")
        if len(parts) < 3 or parts[1] not in LAYERS:
            continue
        for other in imports_of(name, path, known):
            layer = other.split(".")[1] if other.count(".") else None
            if layer in LAYERS and LAYERS.index(layer) > LAYERS.index(parts[1]):
                upward.append(f"{name} -> {other}")
    assert upward == []
    assert set(LAYERS) <= {name.split(".")[1] for name in known if name.count(".") >= 1}


def test_modules_stay_small():
    """A module a reader can hold in mind: about 350 lines at most."""
    sizes = {name: sum(1 for _ in open(path)) for name, path in module_names().items()}
    assert {name: n for name, n in sizes.items() if n > 360} == {}
