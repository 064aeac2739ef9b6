"""The package's folders are its architecture: no import cycles between modules, and no import
that a component's `May import:` line does not allow (read from the source, nothing executed)."""

from __future__ import annotations

import ast
import re
import textwrap
from pathlib import Path

import pytest

from import_graph import component_of, cycles, declared_rules, forbidden_edges, import_edges, module_files

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "openmoshi"


def test_no_import_cycles():
    found = cycles(import_edges(PACKAGE))
    assert not found, "import cycles: " + "; ".join(" -> ".join(c) for c in found)


def test_every_component_says_what_it_may_import():
    rules = declared_rules(PACKAGE)
    assert {"openmoshi.mimi", "openmoshi.lm", "openmoshi.loading", "openmoshi.serving", "openmoshi.cli"} <= set(rules)
    silent = [c for c, allowed in rules.items() if allowed is None]
    assert not silent, f"no 'May import:' line in the docstring of {silent}"
    unknown = {c: sorted(a - set(rules) - {"openmoshi"}) for c, a in rules.items() if a - set(rules) - {"openmoshi"}}
    assert not unknown, f"'May import:' names components that do not exist: {unknown}"


def test_no_forbidden_imports():
    bad = forbidden_edges(import_edges(PACKAGE), declared_rules(PACKAGE))
    assert not bad, "imports the layering forbids:\n" + "\n".join(bad)


def test_layering_rules():
    """The rules themselves: the models import neither serving, nor the CLI, nor acceleration;
    serving never imports the CLI; nothing but the command line imports the command line."""
    rules = declared_rules(PACKAGE)
    for model in ("openmoshi.mimi", "openmoshi.lm", "openmoshi.modules"):
        assert not rules[model] & {"openmoshi.serving", "openmoshi.cli", "openmoshi.accel", "openmoshi.loading"}, model
    assert not {"openmoshi.lm"} & rules["openmoshi.mimi"] and not {"openmoshi.mimi"} & rules["openmoshi.lm"]
    for component, allowed in rules.items():
        if component not in ("openmoshi.cli", "openmoshi.__main__"):
            assert "openmoshi.cli" not in allowed and "openmoshi" not in allowed, component
    edges = import_edges(PACKAGE)
    root_imports = {component_of(t) for t in edges["openmoshi"]}
    assert not root_imports & {"openmoshi.cli", "openmoshi.__main__"}


def test_offered_names_exist():
    """Each `Offers:` entry of a docstring (`module.name`) is defined at the top of that module,
    and the root's lazy names all import."""
    files = module_files(PACKAGE)
    for name, path in files.items():
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        m = re.search(r"^Offers:(.*?)(?:\n\s*\n|\Z)", doc, re.M | re.S)
        if not m:
            continue
        for entry in re.findall(r"`([\w.]+)`", m.group(1)):
            module, _, attr = entry.rpartition(".")
            target = files[f"{name}.{module}"]
            tree = ast.parse(target.read_text())
            defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
            defined |= {t.id for n in tree.body if isinstance(n, (ast.Assign, ast.AnnAssign))
                        for t in (n.targets if isinstance(n, ast.Assign) else [n.target]) if isinstance(t, ast.Name)}
            assert attr in defined, f"{name} offers {entry}, which {target} does not define"
    import openmoshi

    for offered in openmoshi.__all__:
        assert getattr(openmoshi, offered) is not None


def test_readme_names_only_what_exists():
    """Every `openmoshi/...` path and `openmoshi.x.y` module README.md names is in the tree."""
    text = (ROOT / "README.md").read_text()
    files = module_files(PACKAGE)
    paths = set(re.findall(r"openmoshi/[\w/]+(?:\.py)?/?", text))
    # The frame picture names files relative to the package: serving/opus.py, mimi/codec.py ...
    paths |= {f"openmoshi/{p}" for p in re.findall(r"(?<![\w/.])((?:[a-z_]+/)+[\w]+\.(?:py|js))(?!\w)", text)
              if not p.startswith(("openmoshi/", "tests/", "benchmarks/", "deploy/"))}
    missing = [p for p in paths if not (ROOT / p).exists()]
    assert not missing, f"README.md names paths that do not exist: {missing}"
    mods = set(re.findall(r"\bopenmoshi(?:\.[a-z_0-9]+)+", text))
    missing = [m for m in mods if m not in files and m.rpartition(".")[0] not in files]
    assert not missing, f"README.md names modules that do not exist: {missing}"
    for component in {component_of(m) for m in files} - {"openmoshi", "openmoshi.__main__"}:
        assert f"openmoshi/{component.split('.')[1]}" in text, f"README's layout does not mention {component}"


# ----------------------------------------------------------------------------- the checker itself


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "pkg"
    for rel, source in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
    return root


def test_checker_finds_a_cycle_through_a_function_level_import(tmp_path):
    root = _package(tmp_path, {
        "__init__.py": "",
        "a/__init__.py": '"""May import: nothing."""',
        "a/x.py": "from pkg.a import y\n",
        "a/y.py": "def f():\n    from pkg.a.z import g\n",
        "a/z.py": "from . import x\n",
    })
    found = cycles(import_edges(root))
    assert len(found) == 1 and set(found[0]) == {"pkg.a.x", "pkg.a.y", "pkg.a.z"}
    assert found[0][0] == found[0][-1]


def test_checker_names_a_forbidden_edge(tmp_path):
    root = _package(tmp_path, {
        "__init__.py": "",
        "low/__init__.py": '"""Low.\n\nMay import: nothing.\n"""',
        "low/m.py": "def f():\n    import pkg.high.server\n",
        "high/__init__.py": '"""High.\n\nMay import: pkg.low.\n"""',
        "high/server.py": "from pkg.low.m import f\n",
    })
    rules = declared_rules(root)
    assert rules == {"pkg.low": set(), "pkg.high": {"pkg.low"}}
    bad = forbidden_edges(import_edges(root), rules)
    assert len(bad) == 1 and bad[0].startswith("pkg.low.m -> pkg.high.server (line 2)")


@pytest.mark.parametrize("source,target", [
    ("from pkg.b import thing\n", "pkg.b"),          # a name of the package's __init__
    ("from pkg.b import mod\n", "pkg.b.mod"),        # a submodule
    ("import pkg.b.mod\n", "pkg.b.mod"),
    ("from .b.mod import thing\n", "pkg.b.mod"),     # relative
    ("_OFFERED = {'x': 'pkg.b.mod:thing'}\n", "pkg.b.mod"),  # a facade's lazy import
])
def test_checker_resolves_import_forms(tmp_path, source, target):
    root = _package(tmp_path, {"__init__.py": "", "a.py": source, "b/__init__.py": "thing = 1\n",
                               "b/mod.py": "thing = 1\n"})
    assert target in import_edges(root)["pkg.a"]
