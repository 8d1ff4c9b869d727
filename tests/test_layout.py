"""The layout keeps the engine and the faces apart: data flows one way and nothing imports in a circle.

Imports are read from the source (module level and inside functions alike: a lazy import that closes a circle is
still a circle for a reader), resolved to the pack's own modules."""
from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("layer_catalog", "engine", "native", "nodes")
COMFY_TOP_LEVEL = {"folder_paths", "comfy", "server", "execution", "nodes", "comfy_extras", "latent_preview",
                   "model_management", "node_helpers", "comfy_execution", "utils"}
HOST_MODULES = {"nodes.comfy_env", "native.comfy_model"}  # the only ones that may import ComfyUI's own modules


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            rel = path.relative_to(ROOT).with_suffix("")
            name = ".".join(rel.parts)
            mods[name[:-len(".__init__")] if name.endswith(".__init__") else name] = path
    return mods


def _imports(name: str, path: Path, mods: dict) -> tuple[set[str], set[str]]:
    """(the pack's modules it imports, top-level names of absolute imports)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    own, absolute = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            absolute |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                absolute.add(node.module.split(".")[0])
                continue
            base = package.split(".")
            base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
            target = ".".join(base + ([node.module] if node.module else []))
            candidates = [target] + [f"{target}.{a.name}" for a in node.names]
            own |= {c for c in candidates if c in mods and c != name}
    return own, absolute


GRAPH = {}
ABSOLUTE = {}
for _name, _path in _modules().items():
    GRAPH[_name], ABSOLUTE[_name] = _imports(_name, _path, _modules())


def test_no_import_circle():
    done, stack, cycles = set(), [], []

    def visit(m):
        if m in stack:
            cycles.append(stack[stack.index(m):] + [m])
            return
        if m in done:
            return
        stack.append(m)
        for dep in sorted(GRAPH[m]):
            if dep.rpartition(".")[0] != m:  # a package importing its own submodules is not a circle
                visit(dep)
        stack.pop()
        done.add(m)

    for m in sorted(GRAPH):
        visit(m)
    assert cycles == []


@pytest.mark.parametrize("lower", ["layer_catalog", "engine", "native"])
def test_the_engine_never_imports_the_node_faces(lower):
    offenders = {m: sorted(d for d in deps if d.split(".")[0] == "nodes")
                 for m, deps in GRAPH.items() if m.split(".")[0] == lower}
    assert {m: d for m, d in offenders.items() if d} == {}
    if lower == "layer_catalog":  # the ids and the hook engine sit below everything else
        assert {m: sorted(deps) for m, deps in GRAPH.items() if m.startswith(lower)
                and any(d.split(".")[0] != lower for d in deps)} == {}


def test_only_the_host_modules_touch_comfyui():
    touching = {m for m, names in ABSOLUTE.items() if names & COMFY_TOP_LEVEL}
    assert touching <= HOST_MODULES and "nodes.comfy_env" in touching


def test_the_node_faces_are_node_classes():
    """nodes/node_*.py hold ComfyUI node classes (each with INPUT_TYPES, its own or a base's in the same file)."""
    for path in (ROOT / "nodes").glob("node_*.py"):
        classes = [n for n in ast.parse(path.read_text()).body if isinstance(n, ast.ClassDef)]
        faces = {c.name for c in classes if any(isinstance(b, ast.FunctionDef) and b.name == "INPUT_TYPES"
                                                for b in c.body)}
        public = [c for c in classes if not c.name.startswith("_")]
        assert public, path.name
        for c in public:
            assert c.name in faces or any(isinstance(b, ast.Name) and b.id in faces for b in c.bases), \
                f"{path.name}: {c.name}"


def _module_file(dotted: str) -> Path | None:
    """The file of the pack's module `engine.extraction` ('' is the pack itself), or None if there is none."""
    base = ROOT.joinpath(*dotted.split(".")) if dotted else ROOT
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return base.with_suffix(".py") if base.with_suffix(".py").is_file() else None


@functools.lru_cache(maxsize=None)
def _reexports(path: Path) -> set[str]:
    """Names a module's top level binds only by importing them (not in function or class bodies)."""
    imported, defined, todo = set(), set(), list(ast.parse(path.read_text()).body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            imported |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        else:  # assignments, and the statements inside a top-level if / try / with / for
            defined |= {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
            todo += [c for c in ast.iter_child_nodes(node) if isinstance(c, (ast.stmt, ast.excepthandler))]
    return imported - defined


def _misplaced_imports(source: str, where: str, package: str | None) -> list[str]:
    """`from <a module of the pack> import NAME` where that module has no such file or only imports NAME itself.
    package: the importing module's package, for relative imports (None: absolute imports only)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level and package is not None:
            parts = package.split(".") if package else []
            target = ".".join(parts[:len(parts) - (node.level - 1)] + ([node.module] if node.module else []))
        elif not node.level and node.module and node.module.split(".")[0] == "diffusion_feature":
            target = node.module.partition(".")[2]
        else:
            continue
        path = _module_file(target)
        if path is None:
            found.append(f"{where}:{node.lineno}: no module diffusion_feature.{target}")
        elif path.name != "__init__.py":  # a package's __init__ exports are its documented imports
            found += [f"{where}:{node.lineno}: {a.name} from {target}, which only imports it"
                      for a in node.names if a.name in _reexports(path)]
    return found


def test_every_name_is_imported_from_the_module_that_defines_it():
    """No re-export shims: the pack, its tests, benchmarks, scripts and the README's Python blocks import each name
    from the module that defines it (or from a package's documented exports), never from a module that merely
    imports it too, so each name has one home."""
    import re

    found = []
    for path in sorted(ROOT.glob("*.py")) + sorted(p for d in (*PACKAGES, "tests", "bench", "docs",
                                                               "example_workflows") for p in (ROOT / d).rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        own = rel.parts[0] in PACKAGES or len(rel.parts) == 1
        found += _misplaced_imports(path.read_text(), str(rel), ".".join(rel.parts[:-1]) if own else None)
    for n, block in enumerate(re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)):
        found += _misplaced_imports(block, f"README.md python block {n + 1}", None)
    assert found == []


FAMILY_PACKAGE = ROOT / "layer_catalog" / "families"
FAMILY_MACHINERY = {"dit_layout", "__init__", "family", "registry", "meta"}  # the rest of families/ is one module per family


def test_each_family_is_one_module_plus_its_catalog():
    """A family is one module of families/ declaring FAMILY, its shipped configs and its generated catalog."""
    import importlib

    from diffusion_feature.layer_catalog import FAMILIES

    modules = {p.stem for p in FAMILY_PACKAGE.glob("*.py")} - FAMILY_MACHINERY
    assert modules == {name.replace("-", "_") for name in FAMILIES}
    for name, fam in FAMILIES.items():
        module = importlib.import_module(f"diffusion_feature.layer_catalog.families.{name.replace('-', '_')}")
        assert module.FAMILY is fam and fam.name == name
        assert (ROOT / "layer_catalog" / "catalogs" / f"{name}.json").is_file()
        assert (fam.config_dir / "model_index.json").is_file()


def _docstrings(tree) -> set[int]:
    return {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n.body
            and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}


def family_literals(source: str, where: str, names) -> list[str]:
    """file:line of each string constant (docstrings aside) that names a family as a word of its own: a test like
    `family == "sdxl"`, a table keyed by family, or a message listing families by hand."""
    import re

    word = re.compile(r"(?<![\w-])(" + "|".join(re.escape(n) for n in names) + r")(?!\w)")
    tree = ast.parse(source)
    docs = _docstrings(tree)
    hits = [n for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and id(n) not in docs and word.search(n.value)]
    return [f"{where}:{n.lineno}: {n.value[:60]!r}" for n in sorted(hits, key=lambda n: n.lineno)]


def test_family_names_are_literals_only_in_the_families_package():
    """Everything outside layer_catalog/families asks the family table; no code names a family. Benchmarks and
    example builders pick families as their data, and tests and docs are not the package."""
    from diffusion_feature.layer_catalog import FAMILIES

    found = []
    for path in sorted(ROOT.glob("*.py")) + sorted(p for d in PACKAGES for p in (ROOT / d).rglob("*.py")):
        if FAMILY_PACKAGE not in path.parents:
            found += family_literals(path.read_text(), str(path.relative_to(ROOT)), FAMILIES)
    assert found == []


def test_the_family_literal_guard_sees_tests_messages_and_tables():
    names = ("sd15", "playground-v2")
    source = ('"""sd15 in a docstring is prose."""\n'
              'if family == "sd15": pass\n'
              'X = {"playground-v2": 1, "control_v11p_sd15_canny": 2}\n'
              'raise ValueError(f"runs on sd15 and {other}")\n'
              'Y = "random:sd15"\n')
    assert [f.split(":")[1] for f in family_literals(source, "m", names)] == ["2", "3", "4", "5"]


_TAPPING = {"register_forward_hook", "register_forward_pre_hook", "register_full_backward_hook", "set_processor",
            "set_attn_processor", "add_object_patch", "set_model_attn1_replace", "set_model_attn2_replace"}


def test_every_tap_goes_through_the_one_hook_set():
    """Both backends tap networks only through layer_catalog/hook_set.py's HookSet (plain forward hooks, removed
    when the run ends): no other module registers a hook, swaps an attention processor or patches a forward."""
    found = []
    for name, path in _modules().items():
        if path == ROOT / "layer_catalog" / "hook_set.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Attribute) and node.attr in _TAPPING:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.attr}")
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Attribute) and t.attr == "forward"
                                                    for t in node.targets):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} assigns a forward")
    assert not found, found
