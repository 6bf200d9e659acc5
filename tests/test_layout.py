"""The package's shape: one top-level name (`tbcm`), no import circle, the documented layering, and coexistence with
Hugging Face's own `kernels` package (which transformers 5 imports as the top-level name `kernels`)."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "tbcm"
# component -> the components it may import (README, "Tour"); cli wires everything
MAY_IMPORT = {
    "kernels": set(),
    "models": {"kernels"},
    "world": {"models", "kernels"},
    "distill": {"models", "kernels"},
    "service": {"models", "kernels"},
    "cli": {"kernels", "models", "world", "distill", "service"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def our_imports(path: Path) -> set[str]:
    """Every tbcm module a file imports, at any depth (imports inside functions count: they hide circles)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "tbcm"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("tbcm"):
            for alias in node.names:  # `from tbcm.models import generator` imports the module tbcm.models.generator
                sub = f"{node.module}.{alias.name}"
                found.add(sub if (PACKAGE.parent / (sub.replace(".", "/") + ".py")).exists() else node.module)
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path.relative_to(REPO)}: relative import; use the absolute tbcm.* name")
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in our_imports(path) if m in modules and m != name} for name, path in modules.items()}


def test_only_tbcm_is_a_top_level_package():
    installable = sorted(p.parent.name for p in REPO.glob("*/__init__.py"))
    assert installable == ["tbcm"]
    import tomllib
    found = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    assert found["include"] == ["tbcm*"]


def test_no_import_circle():
    edges = graph()
    # a package imports its submodules through __init__; the circle that matters is between modules
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for start in sorted(edges):
        if start not in state:
            visit(start, [start])


def test_layering():
    wrong = []
    for module, imports in graph().items():
        parts = module.split(".")
        if len(parts) < 2:
            continue
        for imported in imports:
            target = imported.split(".")[1] if imported.count(".") else None
            if target and target != parts[1] and target not in MAY_IMPORT[parts[1]]:
                wrong.append(f"{module} imports {imported}")
    assert not wrong, "layering broken (README, Tour): " + "; ".join(sorted(wrong))


def test_the_package_sets_no_environment_on_import():
    code = ("import os; before = dict(os.environ); import tbcm.kernels, tbcm.models.generator, tbcm.service.service; "
            "changed = {k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k)}; "
            "prefixes = ('TRITON', 'TBCM', 'CUDA', 'OMP', 'PYTORCH', 'TOKENIZERS')\n"
            "print(sorted(k for k in changed if k.startswith(prefixes)))")
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "[]"


def test_hugging_face_kernels_and_ours_both_import(tiny_teacher_dir):
    """From the repo root, with HF's `kernels` installed (transformers 5 requires it): `import kernels` is theirs,
    `tbcm.kernels` is ours, and a pipeline folder still loads through transformers and diffusers."""
    import kernels as hf_kernels  # in the lock: transformers>=5 requires it
    assert Path(hf_kernels.__file__).resolve().parent.parent.name == "site-packages"
    code = ("import kernels, tbcm.kernels, sys; from tbcm.models.pipeline import load_pipeline; "
            "p = load_pipeline(sys.argv[1]); "
            "print(kernels.__file__); print(tbcm.kernels.__file__); print(type(p.transformer).__name__)")
    out = subprocess.run([sys.executable, "-c", code, str(tiny_teacher_dir)], capture_output=True, text=True,
                         cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    theirs, ours, transformer = out.stdout.split()
    assert "site-packages" in theirs and Path(ours).resolve().is_relative_to(PACKAGE)
    assert transformer == "SanaTransformer2DModel"
