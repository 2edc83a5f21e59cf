"""The package layers: models <- common <- task folders <- scripts, no task folder importing another
(the one allowed edge: depth/ -> segmentation/, the two mmseg tasks sharing one runner), no cycle, and
models/ importing only torch and timm besides the standard library."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYER = {"models": 0, "common": 1, "pretrain": 2, "linear_eval": 2, "fine_grained": 2, "segmentation": 2, "depth": 2}
LAYER["scripts"] = 3
ALLOWED_SIDEWAYS = {("depth", "segmentation")}
# models/ reads networks and weight files only: torch and its torchvision, timm, safetensors (timm's and the Hub's
# weight format), and the text towers' libraries (open_clip, and transformers for its tokenizers), which the
# families with a text tower import where zero-shot needs them, and onnxruntime, which checks an ONNX export
MODELS_THIRD_PARTY = {"torch", "torchvision", "timm", "safetensors", "open_clip", "transformers", "onnxruntime"}


def imports_of(path: Path) -> set[str]:
    """Absolute module names imported by a file (relative imports resolved), at any depth of the file."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                names.add(".".join([*base, node.module] if node.module else base))
            elif node.module != "__future__":
                names.add(node.module)
    return names


def project_files() -> dict[str, list[Path]]:
    return {pkg: sorted((ROOT / pkg).rglob("*.py")) for pkg in LAYER}


def edges() -> set[tuple[str, str, str]]:
    """(importing package, imported package, file) for every import between project packages."""
    found = set()
    for pkg, files in project_files().items():
        for f in files:
            for name in imports_of(f):
                top = name.split(".")[0]
                if top in LAYER and top != pkg:
                    found.add((pkg, top, str(f.relative_to(ROOT))))
    return found


def test_imports_only_flow_downwards():
    wrong = [
        f"{f}: {a} imports {b}"
        for a, b, f in sorted(edges())
        if LAYER[b] > LAYER[a] or (LAYER[b] == LAYER[a] and (a, b) not in ALLOWED_SIDEWAYS)
    ]
    assert not wrong, "imports against the layers models <- common <- tasks <- scripts:\n" + "\n".join(wrong)


def test_no_cycle_between_packages():
    graph: dict[str, set[str]] = {p: set() for p in LAYER}
    for a, b, _ in edges():
        graph[a].add(b)

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(n == goal or (n not in seen and reaches(n, goal, seen | {n})) for n in graph[start])

    assert not [p for p in graph if reaches(p, p, set())]


def test_models_imports_only_network_and_weight_libraries():
    stdlib = sys.stdlib_module_names
    outside = {
        f"{f.relative_to(ROOT)}: {name}"
        for f in project_files()["models"]
        for name in imports_of(f)
        if name.split(".")[0] not in stdlib | MODELS_THIRD_PARTY | {"models"}
    }
    assert not outside, sorted(outside)


def test_the_walk_sees_a_violation(tmp_path, monkeypatch):
    """The checker itself: an upward import written into a models/ file is found."""
    fake = tmp_path / "models" / "bad.py"
    fake.parent.mkdir()
    fake.write_text("from pretrain.main import main\nfrom . import architectures\nimport numpy\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert imports_of(fake) == {"pretrain.main", "models", "numpy"}
    assert edges() == {("models", "pretrain", "models/bad.py")}


# Keyword-only parameters past three (DINOv3's `save_checkpoint(ckpt_dir, *, iteration, ...)`): a product
# function takes at most three positional parameters besides self/cls, the rest after `*`. These keep their
# positional signature, each for the reason given (the def says so too).
MAX_POSITIONAL = 3
POSITIONAL_ALLOWED: dict[tuple[str, str], str] = {
    ("common.cli", "Store.__call__"): "argparse.Action.__call__: argparse calls it positionally",
    ("common.cli", "OldSwitch.__call__"): "argparse.Action.__call__: argparse calls it positionally",
    ("common.cli", "_Resume.__call__"): "argparse.Action.__call__: argparse calls it positionally",
    ("common.images", "LinkSafeImageFolder.make_dataset"): "overrides torchvision's DatasetFolder.make_dataset",
    ("fine_grained.datasets", "_spec"): "the rows of the DATASETS table, one column per parameter",
    ("models.architectures", "build_vit"): "layout + the ViT shape (embed_dim, depth, heads, mlp_hidden, swiglu)",
    ("models.vision_transformer", "ViT.get_intermediate_layers"): "DINOv2's published API (x, n, reshape, ...)",
    ("segmentation.mmseg_ext", "DenseRunner.load_checkpoint"): "overrides mmengine's Runner.load_checkpoint",
}


def positional_params(path: Path) -> dict[str, list[str]]:
    """Qualified name (Class.method, outer.<locals>.inner) -> positional parameters, self/cls left out, of
    every function in a file with more than MAX_POSITIONAL of them."""
    found: dict[str, list[str]] = {}

    def walk(node: ast.AST, prefix: str, in_class: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = prefix + child.name
                params = [a.arg for a in child.args.posonlyargs + child.args.args]
                static = any(isinstance(d, ast.Name) and d.id == "staticmethod" for d in child.decorator_list)
                if in_class and not static:
                    params = params[1:]  # self / cls
                if len(params) > MAX_POSITIONAL:
                    found[name] = params
                walk(child, name + ".<locals>.", False)
            elif isinstance(child, ast.ClassDef):
                walk(child, prefix + child.name + ".", True)
            else:
                walk(child, prefix, False)

    walk(ast.parse(path.read_text()), "", False)
    return found


def too_many_positional() -> dict[tuple[str, str], list[str]]:
    """(module, qualified name) -> positional parameters, over every product file."""
    return {
        (".".join(f.relative_to(ROOT).with_suffix("").parts), name): params
        for files in project_files().values()
        for f in files
        for name, params in positional_params(f).items()
    }


def test_keyword_only_past_three():
    found = too_many_positional()
    wrong = [f"{m}.{q}({', '.join(p)})" for (m, q), p in sorted(found.items()) if (m, q) not in POSITIONAL_ALLOWED]
    assert not wrong, f"more than {MAX_POSITIONAL} positional parameters: put a `*` after the third\n" + "\n".join(
        wrong
    )
    stale = sorted(set(POSITIONAL_ALLOWED) - set(found))
    assert not stale, f"allowed but no longer positional (or gone): drop them from POSITIONAL_ALLOWED: {stale}"


def test_the_positional_walk_sees_a_violation(tmp_path, monkeypatch):
    """The checker itself: four positional parameters are found, in a function, a method and a closure;
    self, cls, a staticmethod's first and keyword-only parameters are counted as they should be."""
    fake = tmp_path / "models" / "bad.py"
    fake.parent.mkdir()
    fake.write_text(
        "def f(a, b, c, d): pass\n"
        "def ok(a, b, c, *, d, e): pass\n"
        "def ok_star(a, b, c, *args, **kwargs): pass\n"
        "class C:\n"
        "    def m(self, a, b, c): pass\n"
        "    def n(self, a, b, c, d): pass\n"
        "    @classmethod\n"
        "    def k(cls, a, b, c): pass\n"
        "    @staticmethod\n"
        "    def s(a, b, c, d): pass\n"
        "def outer(a, /):\n"
        "    def inner(a, b, /, c, d): pass\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert too_many_positional() == {
        ("models.bad", "f"): ["a", "b", "c", "d"],
        ("models.bad", "C.n"): ["a", "b", "c", "d"],
        ("models.bad", "C.s"): ["a", "b", "c", "d"],
        ("models.bad", "outer.<locals>.inner"): ["a", "b", "c", "d"],
    }


def test_no_merge_conflict_markers_are_left():
    """A merge's leftover markers are valid Markdown and Python strings alike, so no linter sees them."""
    import re
    import subprocess

    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    marker = re.compile(r"^(<{7} |>{7} |={7}$)", re.M)
    texts = [p for p in tracked if p.endswith((".py", ".md", ".sh", ".toml", ".txt", ".yaml", ".yml"))]
    assert [p for p in texts if (ROOT / p).is_file() and marker.search((ROOT / p).read_text())] == []
