"""One `patchwork` namespace whose layers import downwards only.

Layers, and what each may import of Patchwork: the stubs (``v1``) and the
kernels nothing; engines the kernels; training the engines and kernels; the
client library the stubs; serving the stubs, kernels, engines and client;
load tests and benchmarks what they measure. A module or a ``module:name``
string of a higher layer in a lower one is a violation, so is any import of
a layer's bare folder name (``import engines``): it would load a second copy.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

# layer -> the top-level folder that holds it
FOLDERS = {"v1": "protos/patchwork/v1", "kernels": "kernels", "engines": "engines", "training": "training",
           "serving": "serving", "loadtests": "loadtests", "benchmarks": "benchmarks"}
ALLOWED = {
    "v1": set(),
    "kernels": set(),
    "engines": {"kernels"},
    "training": {"kernels", "engines"},
    "client": {"v1"},
    "serving": {"v1", "kernels", "engines", "client"},
    "loadtests": {"v1", "engines", "client", "serving"},
    "benchmarks": {"v1", "kernels", "engines", "training", "client", "serving"},
}
BARE = {"kernels", "engines", "training", "serving", "loadtests", "benchmarks"}


def layer_of(module: str) -> str | None:
    """The layer of ``patchwork.<layer>...`` (``patchwork.client``: the client library)."""
    parts = module.split(".")
    if parts[0] != "patchwork" or len(parts) < 2:
        return None
    return parts[1] if parts[1] in ALLOWED else None


def named_modules(tree: ast.AST) -> list[tuple[int, str]]:
    """Every module a file imports (at any depth) or names in a string constant."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append((node.lineno, node.module))
            if node.module == "patchwork":  # from patchwork import engines
                found += [(node.lineno, f"patchwork.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("patchwork."):
            found.append((node.lineno, node.value.split(":")[0]))
    return found


def violations(root: Path) -> list[str]:
    """What breaks the layering in the tree at ``root`` (the repository's layout)."""
    found = []
    for layer, folder in FOLDERS.items():
        for path in sorted((root / folder).rglob("*.py")):
            where = path.relative_to(root)
            for line, module in named_modules(ast.parse(path.read_text(), str(path))):
                if module.split(".")[0] in BARE:
                    found.append(f"{where}:{line}: imports {module} by its folder's name, not as patchwork.{module}")
                target = layer_of(module)
                if target is not None and target != layer and target not in ALLOWED[layer]:
                    found.append(f"{where}:{line}: the {layer} layer uses {module} ({target})")
    return found


def test_no_layer_imports_a_higher_one():
    assert violations(REPO) == []


def test_the_check_finds_a_kernel_that_imports_an_engine(tmp_path):
    for folder in FOLDERS.values():
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "kernels" / "norm.py").write_text("from patchwork.engines.api import Engine\n")
    (tmp_path / "engines" / "registry.py").write_text('TRAINER = "patchwork.training.blt.cli"\n')
    (tmp_path / "serving" / "app.py").write_text("def f():\n    import engines.layers\n")
    assert violations(tmp_path) == [
        "kernels/norm.py:1: the kernels layer uses patchwork.engines.api (engines)",
        "engines/registry.py:1: the engines layer uses patchwork.training.blt.cli (training)",
        "serving/app.py:2: imports engines.layers by its folder's name, not as patchwork.engines.layers",
    ]


def test_the_package_folder_links_each_layer_to_its_top_level_folder():
    package = REPO / "patchwork"
    links = {path.name: path.resolve() for path in package.iterdir() if path.is_symlink()}
    assert links == {layer: (REPO / folder).resolve() for layer, folder in FOLDERS.items()}
    # No layer folder is a package of its own at the top: nothing there shadows an installed package.
    packages = [folder for folder in FOLDERS.values() if (REPO / folder / "__init__.py").exists()]
    assert packages == ["protos/patchwork/v1"]


def module_names() -> list[str]:
    """The dotted name of every module of the package, from the files of its layers."""
    names = []
    for layer, folder in {**FOLDERS, "client": "patchwork"}.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            if layer == "client":  # the package's own folder: patchwork.client, patchwork.cli ...
                names.append(".".join(("patchwork", *parts)).removesuffix(".__init__"))
            else:
                names.append(".".join(("patchwork", layer, *parts)).removesuffix(".__init__"))
    return names


def loaded_twice(modules: list[str]) -> tuple[list[str], int]:
    """Imports ``modules`` (and every family through the registry's strings) in
    a fresh interpreter: the files of the tree loaded under another name than
    one patchwork.* module, and how many files were loaded."""
    script = f"""
import importlib, sys
from pathlib import Path
for name in {modules!r}:
    importlib.import_module(name)
from patchwork.engines.registry import get_family, known_families
from patchwork.serving.families import served_family
for name in known_families():
    get_family(name), served_family(name)
sources = [Path(p) for p in {[str(REPO / f) for f in (*FOLDERS.values(), "patchwork", "tests")]!r}]
files = {{}}
for name, module in list(sys.modules.items()):
    path = getattr(module, "__file__", None)
    if path and any(Path(path).resolve().is_relative_to(source) for source in sources):
        files.setdefault(Path(path).resolve(), []).append(name)
print(len(files))
for path, names in files.items():
    if len(names) > 1 or not names[0].startswith("patchwork"):
        print(path, names)
"""
    run = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    count, *doubles = run.stdout.splitlines()
    return doubles, int(count)


def test_no_module_is_loaded_under_two_names():
    modules = [name for name in module_names() if not name.endswith(".__main__")]  # commands run when imported
    # The load tests import Locust, which patches the interpreter for gevent first: they get their own.
    load_tests = [name for name in modules if name.startswith("patchwork.loadtests.")]
    rest = [name for name in modules if name not in load_tests]
    for group in (rest, load_tests):
        doubles, count = loaded_twice(group)
        assert doubles == []
        assert count >= len(group)


def test_transformers_and_patchwork_import_together_from_anywhere(tmp_path):
    """transformers brings Hugging Face's `kernels` package; Patchwork's kernels
    are `patchwork.kernels`, from the repository's root and from elsewhere."""
    code = ("import patchwork.engines.layers, transformers.models.blt.modeling_blt, sys; "
            "print(sys.modules['patchwork.kernels.rmsnorm'].__name__); print(sys.modules['kernels'].__file__)")
    for cwd in (REPO, tmp_path):
        run = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, (cwd, run.stderr)
        ours, theirs = run.stdout.splitlines()
        assert ours == "patchwork.kernels.rmsnorm"
        assert Path(theirs).resolve().parent != REPO / "kernels"  # transformers got its own `kernels`
