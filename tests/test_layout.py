"""The house layout, checked: functions stay readable, kernel files stay split by role, the trainer knows
nothing of Ray and the Ray adapter stays thin."""

import ast

from conftest import REPO


def _functions(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node.name, node.end_lineno - node.lineno + 1


def test_no_function_in_distgan_kernels_or_bench_is_longer_than_80_lines():
    long = [f"{path.relative_to(REPO)}:{name} ({n} lines)"
            for folder in ("distgan", "kernels", "bench") for path in sorted((REPO / folder).rglob("*.py"))
            for name, n in _functions(path) if n > 80]
    assert not long, long


def test_no_kernels_file_is_longer_than_700_lines():
    long = {p.name: n for p in (REPO / "kernels").glob("*.py") if (n := len(p.read_text().splitlines())) > 700}
    assert not long, long


def test_the_trainer_imports_nothing_from_ray_and_the_adapter_is_thin():
    imported = set()
    trainer_files = ("trainer.py", "sampler.py", "precision.py", "evaluation.py", "faults.py")
    for node in (n for name in trainer_files for n in ast.walk(ast.parse((REPO / "distgan" / name).read_text()))):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
    assert not [m for m in imported if m == "ray" or m.startswith("ray.")], imported
    assert len((REPO / "distgan" / "loop.py").read_text().splitlines()) <= 150


def _distgan_imports() -> dict[str, set[str]]:
    """Each distgan module's distgan imports, at module level and inside functions alike."""
    import ast

    names = {p.stem for p in (REPO / "distgan").glob("*.py")}
    graph = {}
    for name in names:
        out = set()
        for node in ast.walk(ast.parse((REPO / "distgan" / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "distgan":
                out |= {a.name for a in node.names if a.name in names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("distgan."):
                out.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("distgan.")}
        graph[name] = out - {name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import path that comes back to where it started (a depth-first walk from each module)."""
    found = set()

    def walk(path: list[str]) -> None:
        for nxt in sorted(graph.get(path[-1], ())):
            if nxt == path[0]:
                found.add(tuple(path))
            elif nxt not in path and nxt > path[0]:  # each cycle once, from its smallest module
                walk(path + [nxt])

    for start in sorted(graph):
        walk([start])
    return [list(c) for c in sorted(found)]


def test_distgans_modules_import_one_another_without_a_cycle():
    """A cycle, even through an import inside a function, means two modules share one job (or a constant lives
    in the wrong home); the import graph of distgan/ is a DAG."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # the walk finds one
    assert _cycles(_distgan_imports()) == []
