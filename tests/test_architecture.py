"""The package's layering, checked from the source with ``ast`` (docs/ARCHITECTURE.md describes it).

Every module under ``src/leukoscope`` is parsed; every ``import`` is found, at module top and inside
functions. The rules:

* every module has a layer in :data:`LAYERS`;
* no import from a lower layer to a higher one (same-layer imports are allowed);
* no import circle between modules (imports inside functions count: they only hide a circle);
* imports sit at module top; inside a function only a third-party module from
  :data:`OPTIONAL_HEAVY`, with a comment on its line or just above it saying why.

The first tests check the checker on a toy package, so that it can fail.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE_DIR = REPO / "src" / "leukoscope"

#: module prefix -> layer; a module takes the layer of its longest matching prefix. Lower layers never
#: import higher ones. "leukoscope" itself is the package's __init__ only.
LAYERS = {
    "leukoscope": 0, "leukoscope.taxonomy": 0, "leukoscope.io": 0, "leukoscope.progress": 0,
    "leukoscope.imaging": 1, "leukoscope.data": 1, "leukoscope.synth": 1,
    "leukoscope.models": 2,
    "leukoscope.evaluate": 3,
    "leukoscope.train": 4, "leukoscope.predict": 4, "leukoscope.screen": 4, "leukoscope.review": 4,
    "leukoscope.report": 5, "leukoscope.demo": 5,
    "leukoscope.cli": 6, "leukoscope.__main__": 6,
}

#: third-party modules that may be imported inside a function (with a comment saying why): heavy to
#: import, and needed only on some paths (plots, export, saliency, progress bars, image codecs, ...)
OPTIONAL_HEAVY = {
    "torch", "torchvision", "onnx", "onnxruntime", "captum", "matplotlib", "sklearn", "skimage", "scipy",
    "tqdm", "jinja2", "tifffile", "zarr", "imagecodecs", "safetensors", "timm",
}


@dataclass(frozen=True)
class Import:
    module: str      # the importing module, e.g. leukoscope.train.loop
    target: str      # the imported module, e.g. leukoscope.evaluate.external or numpy
    line: int
    in_function: bool
    commented: bool  # a comment on the import's line or on the line(s) right above it

    def where(self) -> str:
        return f"{self.module}:{self.line}"


def module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _comment_near(lines: list[str], lineno: int) -> bool:
    """A '#' comment on line ``lineno`` (1-based) or in the comment lines directly above it."""
    if "#" in lines[lineno - 1]:
        return True
    above = lineno - 2
    return above >= 0 and lines[above].strip().startswith("#")


class _Collector(ast.NodeVisitor):
    def __init__(self, module: str, is_package: bool, lines: list[str], known: set[str]):
        self.module, self.lines, self.known = module, lines, known
        self.package = module if is_package else module.rpartition(".")[0]
        self.depth = 0
        self.found: list[Import] = []

    def _function(self, node):
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def _add(self, target: str, node):
        self.found.append(Import(self.module, target, node.lineno, self.depth > 0,
                                 _comment_near(self.lines, node.lineno)))

    def visit_Import(self, node: ast.Import):
        for alias in node.names:
            self._add(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom):
        if node.level:
            base = self.package.split(".")
            base = base[: len(base) - (node.level - 1)]
            mod = ".".join(base + ([node.module] if node.module else []))
        else:
            mod = node.module or ""
        for alias in node.names:  # `from pkg import submodule` imports the submodule
            sub = f"{mod}.{alias.name}"
            self._add(sub if sub in self.known else mod, node)


def collect_imports(root: Path) -> tuple[set[str], list[Import]]:
    """Every module of the package under ``root`` and every import statement in them."""
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    known = set(files)
    imports: list[Import] = []
    for name, path in files.items():
        text = path.read_text(encoding="utf-8")
        c = _Collector(name, path.name == "__init__.py", text.splitlines(), known)
        c.visit(ast.parse(text, filename=str(path)))
        imports += c.found
    return known, list(dict.fromkeys(imports))  # `from m import a, b`: one import of m


def layer_of(module: str, layers: dict[str, int]) -> int | None:
    best = None
    for prefix, layer in layers.items():
        if (module == prefix or (prefix != "leukoscope" and module.startswith(prefix + "."))) and \
                (best is None or len(prefix) > len(best[0])):
            best = (prefix, layer)
    return None if best is None else best[1]


def internal(imports: list[Import], known: set[str]) -> list[Import]:
    return [i for i in imports if i.target in known and i.target != i.module]


def unlayered(known: set[str], layers: dict[str, int]) -> list[str]:
    return sorted(m for m in known if layer_of(m, layers) is None)


def upward(imports: list[Import], known: set[str], layers: dict[str, int]) -> list[str]:
    out = []
    for i in internal(imports, known):
        a, b = layer_of(i.module, layers), layer_of(i.target, layers)
        if a is not None and b is not None and a < b:
            out.append(f"{i.where()} (layer {a}) imports {i.target} (layer {b})")
    return out


def circles(imports: list[Import], known: set[str]) -> list[list[str]]:
    """Strongly connected groups of two or more modules (Tarjan), each sorted."""
    graph: dict[str, set[str]] = {m: set() for m in known}
    for i in internal(imports, known):
        graph[i.module].add(i.target)
    index, low, stack, on, out = {}, {}, [], set(), []
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph) + 100))

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def misplaced(imports: list[Import], known: set[str], heavy: set[str]) -> list[str]:
    """Imports inside functions that the rules do not allow."""
    out = []
    for i in imports:
        if not i.in_function:
            continue
        top = i.target.split(".")[0]
        if i.target in known or top == "leukoscope":
            out.append(f"{i.where()}: {i.target} (the package's own modules are imported at module top)")
        elif top not in heavy:
            out.append(f"{i.where()}: {i.target} (not an optional heavy dependency: import it at module top)")
        elif not i.commented:
            out.append(f"{i.where()}: {i.target} (inside a function without a comment saying why)")
    return out


# --------------------------------------------------------------------------- the checker itself


@pytest.fixture
def toy(tmp_path):
    """A toy package 'leukoscope' with a circle, an upward import, an unlayered module and function imports."""
    pkg = tmp_path / "leukoscope"
    files = {
        "__init__.py": "from .taxonomy import CLASSES\n",
        "taxonomy.py": "CLASSES = ()\n",
        "data/__init__.py": "",
        "data/readers.py": "from leukoscope.models import bundle\n",                      # upward: 1 -> 2
        "models/__init__.py": "",
        "models/bundle.py": "def f():\n    from ..evaluate import metrics\n",             # in a function
        "evaluate/__init__.py": "",
        "evaluate/metrics.py": "import json\nfrom leukoscope.models.bundle import f\n",
        "train/__init__.py": "",
        "train/loop.py": ("def g():\n    # optional heavy dependency\n    import torch\n"
                          "def h():\n    import numpy\n    import scipy\n"),
        "odd.py": "",
    }
    for name, text in files.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(text)
    return collect_imports(pkg)


def test_the_checker_finds_circles_upward_imports_and_misplaced_ones(toy):
    known, imports = toy
    assert "leukoscope.models.bundle" in known and "leukoscope" in known
    assert unlayered(known, LAYERS) == ["leukoscope.odd"]
    assert circles(imports, known) == [["leukoscope.evaluate.metrics", "leukoscope.models.bundle"]]
    up = upward(imports, known, LAYERS)
    assert up == ["leukoscope.data.readers:1 (layer 1) imports leukoscope.models.bundle (layer 2)",
                  "leukoscope.models.bundle:2 (layer 2) imports leukoscope.evaluate.metrics (layer 3)"]
    bad = misplaced(imports, known, OPTIONAL_HEAVY)
    assert bad == ["leukoscope.models.bundle:2: leukoscope.evaluate.metrics (the package's own modules are imported "
                   "at module top)",
                   "leukoscope.train.loop:5: numpy (not an optional heavy dependency: import it at module top)",
                   "leukoscope.train.loop:6: scipy (inside a function without a comment saying why)"]


def test_layer_is_the_longest_prefix():
    assert layer_of("leukoscope", LAYERS) == 0
    assert layer_of("leukoscope.cli.train", LAYERS) == 6 and layer_of("leukoscope.train.loop", LAYERS) == 4
    assert layer_of("leukoscope.trainer", LAYERS) is None  # a prefix is a whole dotted part
    assert layer_of("leukoscope.images", LAYERS) is None


# --------------------------------------------------------------------------- the package


@pytest.fixture(scope="module")
def package():
    return collect_imports(PACKAGE_DIR)


def test_every_module_has_a_layer(package):
    known, _ = package
    missing = unlayered(known, LAYERS)
    assert not missing, "modules without a layer (move them into a room, or add them to LAYERS):\n" + "\n".join(missing)


def test_no_import_from_a_lower_layer_to_a_higher_one(package):
    known, imports = package
    up = upward(imports, known, LAYERS)
    assert not up, f"{len(up)} upward imports:\n" + "\n".join(up)


def test_no_import_circle(package):
    known, imports = package
    found = circles(imports, known)
    assert not found, f"{len(found)} import circles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_imports_at_module_top_unless_an_optional_heavy_dependency_says_why(package):
    known, imports = package
    bad = misplaced(imports, known, OPTIONAL_HEAVY)
    assert not bad, f"{len(bad)} imports inside functions:\n" + "\n".join(bad)
