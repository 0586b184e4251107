"""The import direction: import-linter's contracts in `.importlinter` hold, and a wrong-way import breaks them.

The linter runs in a subprocess: grimp finds `library` through the import system, and in this
process `library` is already imported from the repository, so a temporary copy would not be seen.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")  # installed by requirements.txt


def _lint_imports(root: Path, contract: str | None = None) -> subprocess.CompletedProcess:
    """Run `lint-imports` on the packages under `root` with `root/.importlinter`; no cache left behind."""
    command = [str(LINT_IMPORTS), "--no-cache", "--no-logo"]
    if contract:
        command += ["--contract", contract]
    # Only `root` may provide `library` and `networks`; a wide console keeps each report line whole.
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(COLUMNS="400", NO_COLOR="1", TERM="dumb")
    return subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=60)


def _fail_unless(condition: bool, result: subprocess.CompletedProcess, why: str) -> None:
    """Fail with import-linter's own report, which names each broken import with its line."""
    if not condition:
        pytest.fail(f"{why}; lint-imports exited {result.returncode}:\n{result.stdout}{result.stderr}", pytrace=False)


def test_all_import_contracts_are_kept():
    result = _lint_imports(REPO)
    _fail_unless(result.returncode == 0 and "0 broken" in result.stdout, result, "an import goes the wrong way")


def _copy_packages(destination: Path) -> Path:
    """library/, networks/ and .importlinter as they are now, without bytecode."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in ("library", "networks"):
        shutil.copytree(REPO / package, destination / package, ignore=ignore)
    shutil.copy(REPO / ".importlinter", destination / ".importlinter")
    return destination


def _append(path: Path, code: str) -> int:
    """Append `code` (one import line, possibly indented in a function) and return its line number."""
    lines = path.read_text().splitlines()
    lines += ["", ""] + code.splitlines()
    path.write_text("\n".join(lines) + "\n")
    return len(lines)


@pytest.mark.parametrize(
    "contract, file, code, chain",
    [
        # An upward import hidden in a function body: grimp reads those too.
        (
            "library-layers",
            "library/cat/objective.py",
            "def _wrong_way():\n    import library.training.trainer",
            "library.cat.objective -> library.training.trainer",
        ),
        # The adapter reaching into the trainer's package, which does not exist inside sd-scripts.
        (
            "adapter-standalone",
            "networks/lora_cat/layer.py",
            "import library.errors",
            "networks.lora_cat.layer -> library.errors",
        ),
        # The trainer reaching past the family interface into one family.
        (
            "family-seam",
            "library/training/noise.py",
            "import library.families.sd.models",
            "library.training.noise -> library.families.sd.models",
        ),
    ],
)
def test_a_wrong_way_import_breaks_its_contract(tmp_path, contract, file, code, chain):
    root = _copy_packages(tmp_path)
    line = _append(root / file, code)

    result = _lint_imports(root, contract)

    _fail_unless(result.returncode != 0, result, f"{contract} was kept")
    _fail_unless(f"{chain} (l.{line})" in result.stdout, result, f"{chain} (l.{line}) is not reported")
