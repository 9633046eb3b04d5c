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


def test_no_distgan_file_is_longer_than_450_lines():
    long = {p.name: n for p in (REPO / "distgan").glob("*.py") if (n := len(p.read_text().splitlines())) > 450}
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
