"""The README and docs/ say what the code does: the flag tables are TrainConfig's, the set-up commands are what CI
runs, every cited file exists, every measured figure names the results file it comes from, and the product
speaks of the product only.

    python tests/test_docs.py --write     # regenerates docs/usage.md's flag tables from TrainConfig
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from distgan.cli import HELP_GROUPS, SHORT_FLAGS, default_text  # noqa: E402
from distgan.config import TrainConfig  # noqa: E402

README = REPO / "README.md"
USAGE = REPO / "docs" / "usage.md"
DOCS = [README, *sorted((REPO / "docs").glob("*.md")), REPO / "kernels" / "README.md"]
FLAGS_BEGIN, FLAGS_END = "<!-- flags: generated from TrainConfig -->", "<!-- /flags -->"

# A front door, not a lab notebook: what a newcomer reads before the first command fits one screen.
README_MAX_LINES, README_MAX_WORDS, FIRST_SCREEN = 170, 1500, 40


# ------------------------------------------------------------------ the flag tables, generated


def flag_tables() -> str:
    """Markdown: one table per --help group (TrainConfig fields in no group go under "general"), one row per
    field: the flag(s), the dataclass default, the help text and the default's meaning where the literal is not
    the whole truth."""
    by_name = {f.name: f for f in fields(TrainConfig)}
    grouped = {name for _, _, names in HELP_GROUPS for name in names}
    groups = [*HELP_GROUPS, ("general", "", tuple(n for n in by_name if n not in grouped))]
    out = []
    for title, description, names in groups:
        out += [f"**{title}**" + (f": {description}" if description else ""), "",
                "| flag | default | meaning |", "|---|---|---|"]
        for name in names:
            f = by_name[name]
            flag = "--" + name.replace("_", "-")
            shown = f"`{flag} / --no-{flag[2:]}`" if str(f.type) in ("bool", "Optional[bool]") else f"`{flag}`"
            if name in SHORT_FLAGS:
                shown += f", `{SHORT_FLAGS[name]}`"
            meaning = f.metadata.get("help", "")
            if "shown" in f.metadata:
                meaning += f"; default: {default_text(f)}"
            out.append(f"| {shown} | `{f.default}` | {meaning.replace('|', '&#124;')} |")
        out.append("")
    return "\n".join(out)


def _with_tables(text: str) -> str:
    head, rest = text.split(FLAGS_BEGIN, 1)
    _, tail = rest.split(FLAGS_END, 1)
    return f"{head}{FLAGS_BEGIN}\n{flag_tables()}{FLAGS_END}{tail}"


def test_usage_flag_tables_are_generated_from_trainconfig():
    text = USAGE.read_text()
    assert FLAGS_BEGIN in text and FLAGS_END in text
    assert text == _with_tables(text), "docs/usage.md's flag tables differ from TrainConfig: run " \
                                       "`python tests/test_docs.py --write`"


def test_every_field_has_a_row_with_its_current_default():
    # the generator itself: a field added to TrainConfig (in a group or not) gets a row with its default
    tables = flag_tables()
    for f in fields(TrainConfig):
        row = next(line for line in tables.splitlines() if line.startswith(f"| `--{f.name.replace('_', '-')}"))
        assert f"| `{f.default}` |" in row and f.metadata["help"][:20].replace("|", "&#124;") in row, row


# ------------------------------------------------------------------ the README: a front door


def _bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def test_readme_is_short_and_leads_with_the_picture_and_the_first_command():
    text = README.read_text()
    lines = text.splitlines()
    assert len(lines) <= README_MAX_LINES, len(lines)
    words = len(re.findall(r"[A-Za-z0-9][A-Za-z0-9'._/-]*", text))
    assert words <= README_MAX_WORDS, words
    first = "\n".join(lines[:FIRST_SCREEN])
    assert "![" in first and "docs/default-run-samples.png" in first
    assert "```bash\n" in first


SETUP = "python3 -m venv .venv && . .venv/bin/activate && pip install -e '.[dev]' && "


def test_readme_setup_commands_are_the_main_job_and_what_ci_runs():
    commands = [line.strip() for block in _bash_blocks(README.read_text()) for line in block.splitlines()]
    assert SETUP + "python -m distgan.train" in commands
    tests = [c for c in commands if c.startswith(SETUP) and "pytest" in c]
    assert len(tests) == 1, tests
    # .ci/run installs the same way into a fresh venv and runs exactly the README's test command
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    ci_commands = [line.strip() for line in ci if line.strip() and not line.strip().startswith("#")]
    assert "python -m pip install --quiet -e '.[dev]'" in ci_commands
    assert tests[0].removeprefix(SETUP) in ci_commands


def test_readme_smoke_commands_are_the_ones_the_clone_test_runs():
    from support import readme_smoke_commands

    commands = readme_smoke_commands()
    assert [c[:3] for c in commands] == [["python", "-m", "distgan.train"], ["python", "-m", "distgan.sample"]]
    assert "--max-steps" in commands[0]


# ------------------------------------------------------------------ every citation and every figure


def _cited_paths(text: str) -> set[str]:
    """Repository paths a page names: markdown links and images (relative to the page) are resolved by the
    caller; `bench/...`, `docs/...`, `configs/...` etc. in code spans are relative to the repository."""
    return set(re.findall(r"`((?:bench|docs|configs|distgan|kernels|tests|\.ci)/[A-Za-z0-9_.\-/]+)`", text))


def _ignored(path: str) -> bool:
    return subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO).returncode == 0


def test_every_file_the_readme_and_docs_cite_exists():
    missing = []
    for page in DOCS:
        text = page.read_text()
        for path in _cited_paths(text):
            if "<" in path or _ignored(path):  # a pattern, or where a command writes its output
                continue
            if not (list(REPO.glob(path)) if "*" in path else (REPO / path).exists()):
                missing.append(f"{page.relative_to(REPO)}: {path}")
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if "://" not in target and not (page.parent / target).exists():
                missing.append(f"{page.relative_to(REPO)}: ({target})")
    assert not missing, missing


# A measured figure: a time, a rate, a ratio, a size, a quality score. Counts the code decides (steps,
# epochs, image sizes) are not measurements.
MEASURED = re.compile(
    r"\d[\d,.]*\s*(?:images/s|img/s|s a step|s/step|ms\b|GB/s|GB\b|MB\b|MiB\b|kB\b|minutes?\b|min\b|seconds?\b)"
    r"|\b\d+(?:\.\d+)?x\b|\d+(?:\.\d+)?\s*%|\bFID (?:of )?\d|\b(?:classifier )?score (?:of )?\d"
    r"|\bKID \d|\bcoverage \d")
RESULTS = re.compile(r"bench/results/[A-Za-z0-9_.\-]+|\(\.\./bench/results/[^)]+\)")


def _paragraphs(text: str) -> list[str]:
    """Blank-line separated blocks, code blocks dropped (commands and their flags are not figures); a table
    counts with the paragraph before it, which is where a table's source is said."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    blocks, out = re.split(r"\n\s*\n", text), []
    for block in blocks:
        if block.lstrip().startswith("|") and out:
            out[-1] += "\n" + block
        else:
            out.append(block)
    return out


def test_every_measured_figure_names_its_results_file():
    bare = []
    for page in DOCS:
        for para in _paragraphs(page.read_text()):
            if MEASURED.search(para) and not RESULTS.search(para):
                bare.append(f"{page.relative_to(REPO)}: {MEASURED.search(para).group(0)!r} in {para[:100]!r}")
    assert not bare, "figures without their bench/results/ file:\n" + "\n".join(bare)


def test_prose_has_no_dates_and_no_test_counts():
    # a date belongs to the results file that holds the figure (its name and its header); a test count or a
    # suite's time is out of date with the next test
    for page in DOCS:
        text = page.read_text()
        assert not re.findall(r"(?<![_\w-])20\d\d-\d\d(?:-\d\d)?\b", text), page.relative_to(REPO)
        counts = re.findall(r"\b\d[\d,]*\s+(?:tests?\s+)?(?:passed|failed|skipped)\b|\b\d[\d,]*\s+tests\b", text)
        assert not counts, (page.relative_to(REPO), counts)


def test_results_files_are_named_what_where_when():
    committed = subprocess.run(["git", "ls-files", "bench/results"], cwd=REPO, capture_output=True, text=True,
                               check=True).stdout.split()
    assert committed
    for path in map(Path, committed):
        if path.name != "README.md":
            assert re.fullmatch(r"[a-z0-9.\-]+_[a-z0-9.\-]+_\d{4}-\d{2}\.[a-z]+", path.name), path.name


def test_the_product_speaks_of_the_product():
    # no issue numbers, nothing outside the repository, no words about how it was made; tests may quote them
    proc = subprocess.run(["git", "grep", "-nIE", r"issue [0-9]|\blent\b|\.\./shared|seed recipe", "--",
                           ".", ":!tests"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 1 and not proc.stdout, proc.stdout


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/test_docs.py --write")
    USAGE.write_text(_with_tables(USAGE.read_text()))
    print(f"wrote {USAGE.relative_to(REPO)}")
