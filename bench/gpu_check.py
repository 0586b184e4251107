"""The GPU check in one run: the GPU-marked tests, then the memory/speed table, in a time budget.

    bench/gpu_check.sh OUT_DIR                    # on the CUDA machine: installs .whl/, then this
    python3 -m bench.gpu_check OUT_DIR [--budget 450] [--test_timeout 180] [--no_tests] [--no_table]

Writes into OUT_DIR: `gpu_check.md` (environment, test results, the table of `bench.gpu_table`, the
targets) and `gpu_check.json` (the same as data), with the logs of both parts beside them. The tests
(`pytest -m gpu tests/test_gpu.py`) and the table each run in their own process, so a crash or a
timeout in one still leaves the other's results and the report. On a machine without CUDA it says
so in one line and exits 0 (`--device cpu` runs the same steps on the CPU, to test this script).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

from bench import gpu_table

REPO = Path(__file__).resolve().parent.parent
NO_CUDA = "gpu_check: no CUDA device here (torch.cuda.is_available() is False); nothing checked."
PACKAGES = ("torch", "diffusers", "transformers", "accelerate", "peft", "safetensors", "huggingface_hub",
            "tokenizers", "ftfy", "toml", "bitsandbytes", "xformers", "open_clip_torch", "timm", "torchvision", "pytest")
# What each optional package adds, and what is left out without it.
OPTIONAL = {
    "bitsandbytes": ("bitsandbytes", "the 8-bit optimizer tests and the AdamW8bit rows are skipped"),
    "xformers": ("xformers.ops", "the xformers test and rows are skipped"),
    "open_clip_torch": ("open_clip", "the KPS/CLIP scoring (evaluate_kps.py) cannot run here; not part of this check"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="GPU tests and the memory/speed table, in one time budget")
    parser.add_argument("out", type=Path, help="folder for gpu_check.md, gpu_check.json and the logs")
    parser.add_argument("--budget", type=float, default=450.0, help="seconds for the whole check (default 450)")
    parser.add_argument("--test_timeout", type=float, default=180.0, help="seconds at most for the GPU tests")
    parser.add_argument("--no_tests", action="store_true", help="skip the GPU-marked tests")
    parser.add_argument("--no_table", action="store_true", help="skip the memory/speed table")
    parser.add_argument("--models", nargs="+", choices=list(gpu_table.MODELS), default=["sd15", "sdxl", "flux"])
    parser.add_argument("--table_args", default="", help="more arguments for bench.gpu_table, one string")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.budget <= 0 or args.test_timeout <= 0:
        parser.error(f"--budget and --test_timeout must be positive (got {args.budget}, {args.test_timeout})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(NO_CUDA)
        return 0
    deadline = time.monotonic() + args.budget
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"environment": environment(), "command": " ".join(sys.argv), "budget_s": args.budget}
    for line in report["environment"]["notes"]:
        print(line, flush=True)
    report["tests"] = None if args.no_tests else run_tests(args.out, min(args.test_timeout, _left(deadline) - 30))
    report["table"] = None if args.no_table else run_table(args, _left(deadline))
    report["targets"] = gpu_table.targets(report["table"]["rows"]) if report["table"] else []
    report["elapsed_s"] = round(args.budget - _left(deadline), 1)
    write_report(args.out, report)
    print((args.out / "gpu_check.md").read_text())
    failed = report["tests"] is not None and (report["tests"]["failed"] or report["tests"]["status"] != "ran")
    return 1 if failed else 0


def _left(deadline: float) -> float:
    return max(deadline - time.monotonic(), 1.0)


def environment() -> dict:
    """Versions of the packages that matter, the GPU, and one note per optional package that is missing."""
    import torch

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    notes = []
    for package, (module, without) in OPTIONAL.items():
        try:
            importlib.import_module(module)
        except Exception as error:  # not installed, or its binary does not load here
            notes.append(f"{package} not usable here ({type(error).__name__}: {str(error)[:120]}): {without}.")
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"python": sys.version.split()[0], "gpu": gpu, "cuda": torch.version.cuda, "versions": versions, "notes": notes}


# --- the two parts, each in its own process ---------------------------------------------------------


def run_tests(out: Path, timeout: float) -> dict:
    """`pytest -m gpu tests/test_gpu.py` with a JUnit XML file; its log is gpu_tests.log."""
    junit = out / "gpu_tests.xml"
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/test_gpu.py", "-q", "-rs", "-p", "no:cacheprovider",
               "-W", "ignore::DeprecationWarning", f"--junitxml={junit}"]
    status = _run(command, out / "gpu_tests.log", timeout)
    results = read_junit(junit) if junit.exists() else []
    return {"status": status, "command": " ".join(command[1:]), "results": results,
            **{outcome: sum(r["outcome"] == outcome for r in results) for outcome in ("passed", "failed", "skipped")}}


def run_table(args: argparse.Namespace, seconds: float) -> dict:
    """`bench.gpu_table` with what is left of the budget; the rows it wrote are read even if it was stopped."""
    path = args.out / "gpu_table.json"
    budget = max(seconds - 20, 5)  # the table stops starting rows in time; 20 s for the report and a margin
    command = [sys.executable, "-m", "bench.gpu_table", "--out", str(path), "--budget", f"{budget:.0f}",
               "--device", args.device, "--models", *args.models, *args.table_args.split()]
    status = _run(command, args.out / "gpu_table.log", seconds)
    table = json.loads(path.read_text()) if path.exists() else {"rows": [], "stopped": None}
    return {"status": status, "command": " ".join(command[1:]), **table}


def _run(command: list[str], log: Path, timeout: float) -> str:
    """'ran' (whatever its exit status), 'timeout' or 'exit N' for a crash; the output goes to `log`."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    with log.open("w") as handle:
        try:
            result = subprocess.run(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, env=env, timeout=timeout)
        except subprocess.TimeoutExpired:
            return "timeout"
    # pytest: 0 all passed, 1 some failed, 5 none collected; anything else means it did not run through.
    return "ran" if result.returncode in (0, 1, 5) else f"exit {result.returncode}"


def read_junit(path: Path) -> list[dict]:
    """One {name, outcome, message} per test case of a JUnit XML file written by pytest."""
    cases = []
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error"):
                outcome, message = "failed", child.get("message", "")
            elif child.tag == "skipped":
                outcome, message = "skipped", child.get("message", "")
        cases.append({"name": f"{case.get('classname', '')}::{case.get('name', '')}", "outcome": outcome,
                      "message": message[:300]})
    return cases


# --- the report -------------------------------------------------------------------------------------


def write_report(out: Path, report: dict) -> None:
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    (out / "gpu_check.md").write_text(report_markdown(report))


def report_markdown(report: dict) -> str:
    env = report["environment"]
    versions = ", ".join(f"{name} {version}" for name, version in env["versions"].items() if version)
    missing = ", ".join(name for name, version in env["versions"].items() if not version) or "none"
    lines = [f"# GPU check: {env['gpu'] or 'no GPU'}", "",
             f"Python {env['python']}, CUDA {env['cuda']}; {versions}; not installed: {missing}.",
             f"Took {report['elapsed_s']} s of a {report['budget_s']:g} s budget.", ""]
    lines += [f"- {note}" for note in env["notes"]]
    lines += ["", "## GPU-marked tests", ""] + _tests_markdown(report["tests"])
    lines += ["", "## Memory and speed", ""] + _table_markdown(report["table"], report["targets"])
    return "\n".join(lines) + "\n"


def _tests_markdown(tests: dict | None) -> list[str]:
    if tests is None:
        return ["Not run (--no_tests)."]
    lines = [f"`{tests['command']}`: {tests['status']}; {tests['passed']} passed, {tests['failed']} failed, "
             f"{tests['skipped']} skipped (log: gpu_tests.log)."]
    for result in tests["results"]:
        if result["outcome"] != "passed":
            lines.append(f"- {result['outcome']}: {result['name']}: {result['message']}")
    return lines


def _table_markdown(table: dict | None, found: list[dict]) -> list[str]:
    if table is None:
        return ["Not run (--no_table)."]
    device = table.get("device", {})
    lines = [f"`{table['command']}`: {table['status']}; {table.get('stopped') or 'no rows written'} "
             f"(device: {device.get('name') or device.get('type', '?')}, torch {device.get('torch', '?')}; "
             "GB = 10^9 bytes; peak memory includes the frozen weights; log: gpu_table.log).", ""]
    if table["rows"]:
        lines += [gpu_table.markdown_table(table["rows"]), "", "Targets:", gpu_table.targets_markdown(found)]
    return lines


if __name__ == "__main__":
    sys.exit(main())
