"""The import layers: the contract in pyproject.toml, the module table of docs/architecture.md, the
list of lazy imports, the remote-code files of the HF export, and a config error before torch loads."""
import ast
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "nld_train"
IMPORTLINTER = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]


def contract_layers() -> list[list[str]]:
    """The layers contract, top first: each layer a list of module names (``nld_train.x``)."""
    (layers,) = [c["layers"] for c in IMPORTLINTER["contracts"] if c["type"] == "layers"]
    return [[m.strip() for m in layer.split("|")] for layer in layers]


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path):
    """(imported nld_train module, inside a function?) for every import statement of ``path``."""
    pkg = module_name(path) if path.name == "__init__.py" else module_name(path).rsplit(".", 1)[0]
    out = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                out.extend((a.name, in_function) for a in child.names if a.name.startswith("nld_train"))
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:   # relative: resolve against this module's package
                    up = pkg.split(".")[: len(pkg.split(".")) - child.level + 1]
                    base = ".".join(up + ([base] if base else []))
                if base.startswith("nld_train"):
                    # "from nld_train.x import y" may name the submodule nld_train.x.y
                    for a in child.names:
                        sub = f"{base}.{a.name}"
                        is_module = (PKG.parent / sub.replace(".", "/")).with_suffix(".py").is_file() or \
                            (PKG.parent / sub.replace(".", "/") / "__init__.py").is_file()
                        out.append((sub if is_module else base, in_function))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))
    visit(ast.parse(path.read_text()), False)
    return out


def import_graph() -> dict:
    """{module: {imported nld_train modules}} over every file of the package (top and lazy imports)."""
    return {module_name(p): {m for m, _ in imports(p)} for p in PKG.rglob("*.py")}


def owner(module: str, names) -> str | None:
    hits = [n for n in names if module == n or module.startswith(n + ".")]
    return max(hits, key=len) if hits else None


def test_every_module_is_in_a_layer():
    names = [m for layer in contract_layers() for m in layer]
    missing = sorted(m for m in import_graph() if m != "nld_train" and owner(m, names) is None)
    assert not missing, f"modules outside the layers contract (add them to pyproject.toml): {missing}"


def test_lazy_imports_are_the_listed_ones():
    """Every nld_train import inside a function is listed with its reason, and every entry is used."""
    found = set()
    for p in PKG.rglob("*.py"):
        found |= {f"{module_name(p)} -> {m}" for m, lazy in imports(p) if lazy}
    listed = set(IMPORTLINTER["lazy_imports"])
    assert not found - listed, f"lazy imports not listed in [tool.importlinter.lazy_imports]: {sorted(found - listed)}"
    assert not listed - found, f"stale entries in [tool.importlinter.lazy_imports]: {sorted(listed - found)}"
    assert all(reason.strip() for reason in IMPORTLINTER["lazy_imports"].values())


def architecture_table() -> list[tuple[int, str, set]]:
    """(layer, nld_train module, {imported layer modules}) per row of docs/architecture.md's table."""
    text = (REPO / "docs" / "architecture.md").read_text()
    section = text[text.index("## Modules and layers"):]
    rows = []
    for line in section.splitlines()[1:]:
        if line.startswith("## "):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 4 or not cells[0].isdigit():
            continue
        name = "nld_train." + cells[1].strip("`").rstrip("/").removesuffix(".py").replace("/", ".")
        deps = {f"nld_train.{d.strip()}" for d in cells[3].split(",") if d.strip() not in ("", "—")}
        rows.append((int(cells[0]), name, deps))
    return rows


def test_architecture_table_is_the_contract_and_the_import_graph():
    rows = architecture_table()
    layers = contract_layers()
    by_layer = [sorted(name for n, name, _ in rows if n == i + 1) for i in range(len(layers))]
    assert by_layer == [sorted(layer) for layer in layers], \
        "docs/architecture.md's layer column differs from the layers contract in pyproject.toml"
    names = [m for layer in layers for m in layer]
    graph = import_graph()
    for _, name, deps in rows:
        actual = {owner(m, names) for mod, imported in graph.items() if owner(mod, names) == name
                  for m in imported} - {None, name}
        assert deps == actual, f"docs/architecture.md: {name} imports {sorted(actual)}, the table says {sorted(deps)}"


def test_remote_code_is_flat_and_imports_only_torch_and_transformers():
    """The files nld-convert to-hf copies into one folder: unique names (remote_code_sources
    refuses duplicates) and, besides the standard library, only torch / transformers (safetensors
    comes with transformers)."""
    from nld_train.convert.export import remote_code_sources
    files = remote_code_sources()
    assert {"hf_wrapper.py", "hf_format.py", "decoding.py", "model.py"} <= set(files)
    allowed = {"torch", "transformers", "safetensors", "__future__"} | set(sys.stdlib_module_names)
    for name, src in files.items():
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.Import):
                tops = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level:
                tops = {node.module.split(".")[0]}
            else:
                continue
            assert tops <= allowed, f"remote code {name} imports {sorted(tops - allowed)}"


@pytest.mark.parametrize("argv, needle", [
    (["recipe=smoke", "no.such.key=1"], "no.such.key"),
    # (data.path set: the demo recipe's data resolver would build the demo corpus, with megatron)
    (["recipe=smoke", "data.path=/nonexistent/x", "eval.modes=[nonsense]"], "eval.modes: unknown mode"),
])
def test_bad_config_fails_before_torch_is_imported(tmp_path, argv, needle):
    """A wrong key or value is reported (exit 2, one message naming it) by a process that never
    imported torch or megatron."""
    probe = ("import json, sys\n"
             "from nld_train.cli import main\n"
             f"rc = main({argv!r})\n"
             "heavy = sorted(m for m in ('torch', 'megatron', 'transformers') if m in sys.modules)\n"
             "print(json.dumps({'rc': rc, 'heavy': heavy}))\n")
    r = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out == {"rc": 2, "heavy": []}, (out, r.stderr[-2000:])
    assert "configuration error" in r.stderr and needle in r.stderr, r.stderr[-2000:]
