#!/usr/bin/env python
"""Modules made unimportable, as on a machine that lacks them: a sitecustomize.py that a process finds first on
PYTHONPATH (so do the processes it starts, Ray's workers included). The GPU check's CPU rehearsal hides what the
GPU image lacks this way (bench/gpu_check.sh --rehearse); the tests hide single packages.

    python bench/_hide.py DIR NAME...     # writes DIR/sitecustomize.py hiding each NAME and its submodules
"""

from __future__ import annotations

import sys
from pathlib import Path

SITECUSTOMIZE = """import sys
from importlib.machinery import PathFinder

HIDDEN = {hidden!r}


class _Hide:  # what an environment without these modules does on import: ModuleNotFoundError
    def find_spec(self, name, path=None, target=None):
        if not any(name == h or name.startswith(h + ".") for h in HIDDEN):
            return None
        spec = PathFinder.find_spec(name, path)
        if spec is not None and "thirdparty_files" in str(spec.origin or spec.submodule_search_locations):
            return spec  # Ray's own vendored copy (its runtime-env agent's aiohttp) ships with Ray itself
        raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)


sys.meta_path.insert(0, _Hide())
"""


def write(directory: Path, names) -> Path:
    """DIR/sitecustomize.py hiding `names` (dotted names hide that module and its submodules only)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "sitecustomize.py"
    path.write_text(SITECUSTOMIZE.format(hidden=sorted(names)))
    return path


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    write(Path(sys.argv[1]), sys.argv[2:])
