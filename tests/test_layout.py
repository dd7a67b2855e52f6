"""The layout: the paper at the root, this project's additions in extras/ (and the demo's builder in
demokit/), joined at a few marked seams.

- A run with the paper's recipe (pretrain -> finetune -> evaluate, tiny models) never imports extras/
  nor demokit/: both are blocked while it runs.
- The root's files reach extras/ or demokit/ only inside an `if` whose line is marked
  `# extras: <what>`; the concept files hold at most 12 such seams.
- Leaving out those seam imports, the project's import graph (top-level and function-level imports
  alike; a package's imports of its own modules aside) has no cycle.

    python -m pytest -q tests/test_layout.py
"""

import ast
import json
import sys
from pathlib import Path

import pytest
from tiny import argv, write_manifest

ROOT = Path(__file__).resolve().parents[1]
CONCEPT_FILES = ["model.py", "contrastive.py", "contrastive_fast.py", "data.py", "pretrain.py",
                 "finetune.py", "evaluate.py"]  # fmt: skip
ROOT_FILES = CONCEPT_FILES + ["common.py"]
ADDITIONS = ("extras", "demokit")


def imported_modules(node):
    """The project modules an import statement names (the first part of each dotted name)."""
    if isinstance(node, ast.Import):
        return [alias.name.split(".")[0] for alias in node.names]
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        return [node.module.split(".")[0]]
    return []


def seam_imports(path, tree):
    """(the nodes inside an `if` marked `# extras:`, every other import of extras/demokit, the number
    of marked `if`s) of one root file, parsed as `tree`."""
    lines = path.read_text().splitlines()
    seams, inside = 0, set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "# extras:" in lines[node.lineno - 1]:
            seams += 1
            inside |= {id(n) for n in ast.walk(node)}
    stray = [
        (path.name, node.lineno)
        for node in ast.walk(tree)
        if id(node) not in inside and set(imported_modules(node)) & set(ADDITIONS)
    ]
    return inside, stray, seams


def test_the_root_reaches_the_additions_only_at_marked_seams():
    seams = {}
    for name in ROOT_FILES:
        path = ROOT / name
        _, stray, seams[name] = seam_imports(path, ast.parse(path.read_text()))
        assert not stray, f"an import of extras/ or demokit/ outside a marked seam: {stray}"
    assert sum(seams[name] for name in CONCEPT_FILES) <= 12, seams
    assert seams["common.py"] == 0 and seams["contrastive.py"] == seams["data.py"] == 0


def project_graph():
    """module -> the project modules it imports anywhere, less the root's marked seams."""
    files = [ROOT / f for f in ROOT_FILES]
    files += sorted((ROOT / "extras").glob("*.py")) + sorted((ROOT / "demokit").glob("*.py"))
    names = {p.stem for p in ROOT.glob("*.py")} | set(ADDITIONS)
    graph = {}
    for path in files:
        module = path.parent.name if path.stem == "__init__" else path.stem
        if path.parent.name in ADDITIONS and path.stem != "__init__":
            module = f"{path.parent.name}.{path.stem}"
        tree = ast.parse(path.read_text())
        skip = seam_imports(path, tree)[0] if path.parent == ROOT else set()
        edges = graph.setdefault(module, set())
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                target = node.module
                if target in ADDITIONS:  # from extras import ctc: the submodules
                    edges |= {f"{target}.{a.name}" for a in node.names
                              if (ROOT / target / f"{a.name}.py").exists()} or {target}  # fmt: skip
                elif target.split(".")[0] in names:
                    edges.add(target)
            elif isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name.split(".")[0] in names}
        # a package and its own modules (demokit's lazy builders) are one unit here
        edges -= {e for e in edges if e.split(".")[0] == module.split(".")[0]}
    return graph


def test_the_import_graph_has_no_cycle():
    graph = project_graph()
    state = {}

    def visit(module, path):
        if state.get(module) == "done":
            return
        assert state.get(module) != "open", f"import cycle: {' -> '.join(path + [module])}"
        state[module] = "open"
        for target in graph.get(module, ()):
            visit(target, path + [module])
        state[module] = "done"

    for module in graph:
        visit(module, [])
    assert "demokit" in graph["extras.demo"] and "common" not in graph.get("common", ())
    assert not any(m.startswith(ADDITIONS) for m in graph["common"] | graph["model"])


class Blocked:
    """A meta-path finder that refuses extras/ and demokit/: importing either raises ImportError."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ADDITIONS:
            raise ImportError(f"{name} was imported by a paper-recipe run")
        return None


@pytest.fixture
def no_additions(monkeypatch):
    for name in [m for m in sys.modules if m.split(".")[0] in ADDITIONS]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [Blocked(), *sys.meta_path])


def test_the_papers_recipe_runs_without_the_additions(paths, tmp_path, no_additions):
    """pretrain.py -> finetune.py -> evaluate.py with the paper's recipe (tiny Llama and HuBERT
    folders), extras/ and demokit/ blocked."""
    import evaluate
    import finetune
    import pretrain

    data = write_manifest(tmp_path, n=8, extra={i: {"question": "who?", "answer": "anna"}
                                                for i in range(8)})  # fmt: skip
    common = "--llm {llm} --encoder {hubert} --device cpu --dtype float32 --batch-size 4"
    small = " --qformer-dim 32 --qformer-heads 4 --qformer-layers 2 --window 4"
    values = dict(paths, data=data, s1=tmp_path / "s1", s2=tmp_path / "s2")
    pretrain.main(argv(common + small + " --data {data} --dev-data {data} --max-steps 2 --out {s1}",
                       **values))  # fmt: skip
    meta = json.loads((tmp_path / "s1" / "meta.json").read_text())
    assert meta["recipe"]["name"] == "paper" and meta["additions"] == {}
    finetune.main(argv(common + " --task qa --init {s1} --data {data} --dev-data {data}"
                       " --max-steps 2 --out {s2}", **values))  # fmt: skip
    result = evaluate.main(argv("--ckpt {s2} --data {data} --device cpu --limit 2", **values))
    assert result["qa"]["decoding"]["max_new_tokens"] == 200 and result["qa"]["n"] >= 1
    assert not [m for m in sys.modules if m.split(".")[0] in ADDITIONS]
