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
# families with a text tower import where zero-shot needs them
MODELS_THIRD_PARTY = {"torch", "torchvision", "timm", "safetensors", "open_clip", "transformers"}


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
