"""The package's layering, read from the source: each subpackage imports only from those below it (and from
itself), and no modules import each other, directly or round a longer cycle."""

import ast
import subprocess
from pathlib import Path

import pytest

import fitnets_cli

SRC = Path(fitnets_cli.__file__).parent
# Bottom to top. Packages of one rank (networks and data) are peers: neither imports the other.
LAYERS = [["config"], ["runtime"], ["networks", "data"], ["training"], ["commands"], ["api"], ["cli"], ["__main__"]]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def modules() -> dict[str, Path]:
    """fitnets_cli's modules by dotted name (a package by its own name), less the config files' package."""
    found = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        if parts[0] == "conf":
            continue
        found[".".join(("fitnets_cli",) + parts).removesuffix(".__init__")] = path
    return found


def imports(path: Path, known: set[str]) -> set[str]:
    """The fitnets_cli modules a file imports, at the top or inside functions: `from fitnets_cli.a import b`
    counts as fitnets_cli.a.b where that is a module, else as fitnets_cli.a."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fitnets_cli"):
            assert node.level == 0, f"{path}: a relative import; write fitnets_cli.... in full"
            subs = {f"{node.module}.{a.name}" for a in node.names} & known
            found |= subs or {node.module}
    return found - {"fitnets_cli"}


def layer(module: str) -> str:
    return module.split(".")[1]


def upward(graph: dict) -> list[str]:
    """The imports of a module from a layer above its own, or from a peer package of its rank."""
    return [f"{m} imports {t}" for m, targets in graph.items() if m != "fitnets_cli" for t in targets
            if layer(t) != layer(m) and RANK[layer(t)] >= RANK[layer(m)]]


def cycles(graph: dict) -> list[str]:
    """Each cycle of imports found by a depth-first walk, as a -> b -> a."""
    found, done = [], set()

    def visit(m, path):
        if m in path:
            found.append(" -> ".join(path[path.index(m):] + [m]))
            return
        if m in done:
            return
        done.add(m)
        for t in sorted(graph[m]):
            visit(t, path + [m])

    for m in sorted(graph):
        visit(m, [])
    return found


GRAPH = {m: imports(p, set(modules())) for m, p in modules().items()}


def test_every_module_sits_in_a_layer():
    assert {layer(m) for m in GRAPH if m != "fitnets_cli"} <= set(RANK), "a subpackage missing from LAYERS"


def test_imports_go_only_downward():
    assert not upward(GRAPH)


def test_no_module_imports_itself_round_a_cycle():
    assert not cycles(GRAPH)


def test_the_checks_catch_an_upward_import_a_peer_import_and_a_cycle(tmp_path):
    (tmp_path / "m.py").write_text("from fitnets_cli.cli import main\ndef f():\n    from fitnets_cli.data import load\n")
    assert imports(tmp_path / "m.py", {"fitnets_cli.cli", "fitnets_cli.data.load"}) == \
        {"fitnets_cli.cli", "fitnets_cli.data.load"}   # function-level imports count
    graph = {"fitnets_cli.training.loop": {"fitnets_cli.commands.compare"},
             "fitnets_cli.networks.build": {"fitnets_cli.data.load"},
             "fitnets_cli.data.load": {"fitnets_cli.data.images"}, "fitnets_cli.data.images": {"fitnets_cli.data.load"},
             "fitnets_cli.commands.compare": set()}
    assert upward(graph) == ["fitnets_cli.training.loop imports fitnets_cli.commands.compare",
                             "fitnets_cli.networks.build imports fitnets_cli.data.load"]
    assert cycles(graph) == ["fitnets_cli.data.images -> fitnets_cli.data.load -> fitnets_cli.data.images"]


def test_no_source_file_is_ignored_by_git():
    """A .gitignore pattern that catches a package folder (`data/` once hid fitnets_cli/data/) leaves a
    clean clone without modules that the working tree has, so CI fails where the tests here pass."""

    root = SRC.parent.parent
    if not (root / ".git").exists():
        pytest.skip("not a git checkout (an installed package)")
    files = [str(p.relative_to(root)) for d in ("src", "tests", "conf", "scripts") for p in (root / d).rglob("*")
             if p.is_file() and "__pycache__" not in p.parts and ".egg-info" not in str(p)]
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *files], cwd=root, capture_output=True, text=True)
    assert ignored.stdout.split() == [], f"files git would leave out of a clone: {ignored.stdout.split()}"
