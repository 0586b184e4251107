"""The GPU check's CPU-side parts (bench/gpu_check.py, bench/gpu_table.py, bench/fetch_gpu_wheels.py):
argument parsing, the table, the targets and the report from fake measurements, the wheel list, the
no-CUDA branch, and the CUDA code paths that a CPU can run (the table's rows on the tiny models, the
whole check with --device cpu)."""

import importlib.metadata
import json
import os
import re
import subprocess
import sys
import zipfile
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from bench import fetch_gpu_wheels as wheels
from bench import gpu_check, gpu_table
from bench.gpu_table import Setting

REPO = Path(__file__).resolve().parent.parent
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="the no-CUDA branch needs a machine without CUDA")


@pytest.fixture
def one_thread():
    """Two OpenMP threads on a 2-core machine shared with other processes run the tiny model 100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- arguments --------------------------------------------------------------------------------------


def test_gpu_check_arguments():
    args = gpu_check.parse_args(["out"])
    assert args.out == Path("out") and args.budget == 450 and args.models == ["sd15", "sdxl", "flux"] and args.device == "cuda"
    args = gpu_check.parse_args(["o", "--budget", "60", "--no_tests", "--table_args=--steps 2 --warmup 1"])
    assert args.budget == 60 and args.no_tests and args.table_args.split() == ["--steps", "2", "--warmup", "1"]
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["o", "--budget", "0"])
    with pytest.raises(SystemExit):
        gpu_check.parse_args([])


def test_gpu_table_arguments():
    args = gpu_table.parse_args(["--out", "t.json"])
    assert args.models == ["sd15", "sdxl", "flux"] and args.steps == 5 and args.warmup == 2 and args.budget == 300
    with pytest.raises(SystemExit):
        gpu_table.parse_args(["--out", "t.json", "--steps", "0"])
    with pytest.raises(SystemExit):
        gpu_table.parse_args(["--out", "t.json", "--models", "sd3"])


def test_the_most_important_settings_come_first_and_none_twice():
    settings = gpu_table.planned_settings(["sd15", "sdxl"])
    assert settings[0] == gpu_table.MEMORY_TARGET_SETTING
    assert len(settings) == len(set(settings)) == 2 * 3 * 2 * 2 * 2 * 2  # model, precision, ckpt, attention, optimizer, batch
    assert settings[2].model == "sdxl", "SDXL's first setting comes early, before the budget runs out"
    assert [s for s in gpu_table.planned_settings(["tiny"]) if s.model != "tiny"] == []
    with_flux = gpu_table.planned_settings(["sd15", "sdxl", "flux"])
    assert with_flux[3].model == "flux", "FLUX.1's first setting right after SDXL's"
    assert (with_flux[4].model, with_flux[4].precision) == ("flux", "fp8"), "then with --fp8_base"


# --- the table, the targets, the report (fake measurements) ----------------------------------------


def _row(setting, method, peak=None, seconds=None, status="ok", reason=None):
    row = {"setting": asdict(setting), "method": method, "resolution": 512, "status": status, "reason": reason}
    if status == "ok":
        row.update(seconds=seconds, peak_allocated_bytes=peak, peak_reserved_bytes=peak and peak * 1.2,
                   weights_bytes=2e9, skipped_steps=0)
    return row


FAKE = [
    _row(gpu_table.MEMORY_TARGET_SETTING, "plain LoRA", 4.0e9, 0.10),
    _row(gpu_table.MEMORY_TARGET_SETTING, "CAT sequential", 4.4e9, 0.27),
    _row(gpu_table.MEMORY_TARGET_SETTING, "CAT batched", 7.0e9, 0.22),
    _row(Setting("sdxl", "bf16", False, "sdpa", "AdamW", 4), "plain LoRA", status="oom", reason="CUDA out of memory"),
    _row(Setting("sd15", "fp16", True, "xformers", "AdamW8bit", 1), "plain LoRA", status="skipped",
         reason="xformers is not installed"),
]


def test_the_table_shows_ratios_to_plain_lora_and_why_a_row_is_missing():
    table = gpu_table.markdown_table(FAKE).splitlines()
    assert len(table) == 2 + len(FAKE)
    assert all(line.count("|") == table[0].count("|") for line in table)
    sequential = table[3].split(" | ")
    assert sequential[7:13] == ["CAT sequential", "4.40", "5.28", "1.10", "0.270", "2.70"]
    assert "oom: CUDA out of memory" in table[5] and "skipped: xformers is not installed" in table[6]


def test_the_targets_say_which_are_missed_and_by_how_much():
    memory, ratio, speed = gpu_table.targets(FAKE)
    assert memory["met"] is True and memory["value"] == pytest.approx(4.4)
    assert ratio["met"] is False and "missed by 0.05 x (5% over 1.05 x)" in ratio["detail"]
    assert speed["met"] is False and speed["value"] == pytest.approx(2.7)
    assert [t["met"] for t in gpu_table.targets([])] == [None, None, None]
    text = gpu_table.targets_markdown([memory, ratio, speed])
    assert text.splitlines()[0].startswith("- met: SD 1.5") and text.count("MISSED") == 2


def test_the_report_is_one_markdown_file_and_one_json_file(tmp_path):
    report = {
        "environment": {"python": "3.12.3", "gpu": "NVIDIA H200", "cuda": "13.0",
                        "versions": {"torch": "2.11.0", "xformers": None}, "notes": ["xformers not usable here: ..."]},
        "command": "bench/gpu_check.py out", "budget_s": 450.0, "elapsed_s": 400.0,
        "tests": {"status": "ran", "command": "pytest -m gpu", "passed": 1, "failed": 1, "skipped": 0,
                  "results": [{"name": "t::a", "outcome": "passed", "message": ""},
                              {"name": "t::b", "outcome": "failed", "message": "assert 1 == 2"}]},
        "table": {"status": "ran", "command": "bench.gpu_table", "stopped": "all 1 settings measured",
                  "device": {"name": "NVIDIA H200", "torch": "2.11.0"}, "rows": FAKE},
        "targets": gpu_table.targets(FAKE),
    }
    gpu_check.write_report(tmp_path, report)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_check.json", "gpu_check.md"]
    assert json.loads((tmp_path / "gpu_check.json").read_text())["table"]["rows"][1]["method"] == "CAT sequential"
    text = (tmp_path / "gpu_check.md").read_text()
    assert "# GPU check: NVIDIA H200" in text and "not installed: xformers" in text
    assert "- failed: t::b: assert 1 == 2" in text and "t::a" not in text
    assert gpu_table.markdown_table(FAKE) in text and "MISSED" in text


def test_junit_results_are_read(tmp_path):
    path = tmp_path / "j.xml"
    path.write_text('<testsuites><testsuite><testcase classname="tests.test_gpu" name="test_a"/>'
                    '<testcase classname="tests.test_gpu" name="test_b"><failure message="boom"/></testcase>'
                    '<testcase classname="tests.test_gpu" name="test_c"><skipped message="needs CUDA"/></testcase>'
                    '</testsuite></testsuites>')
    assert gpu_check.read_junit(path) == [
        {"name": "tests.test_gpu::test_a", "outcome": "passed", "message": ""},
        {"name": "tests.test_gpu::test_b", "outcome": "failed", "message": "boom"},
        {"name": "tests.test_gpu::test_c", "outcome": "skipped", "message": "needs CUDA"},
    ]


# --- the wheel list ---------------------------------------------------------------------------------


def _requirements() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.-]+)==([^\s#]+)", line)
        if match:
            pins[wheels.normalized(match.group(1))] = match.group(2)
    return pins


def test_the_wheel_list_matches_requirements_txt():
    pins = _requirements()
    names = [wheels.normalized(w.name) for w in wheels.WHEELS]
    assert len(names) == len(set(names)), "one version of each package: two stop the whole install"
    # What requirements.txt needs and the GPU image lacks (device KINDS.md).
    assert {"diffusers", "toml", "open_clip_torch", "ftfy", "bitsandbytes"} <= set(names)
    for wheel in wheels.WHEELS:
        name = wheels.normalized(wheel.name)
        if name in pins:
            assert wheel.version == pins[name], f"{wheel.name}: {wheel.version} here, {pins[name]} in requirements.txt"
        elif name != "xformers":  # GPU only, not in requirements.txt: its version must allow torch 2.11
            assert importlib.metadata.version(wheel.name) == wheel.version, f"{wheel.name} is not the venv's version"
    assert not {"torch", "transformers", "accelerate", "safetensors", "peft"} & set(names), "the image has these"


def test_wheel_helpers(tmp_path):
    assert wheels.wheel_name_version("open_clip_torch-3.3.0-py3-none-any.whl") == ("open_clip_torch", "3.3.0")
    assert wheels.normalized("lazy-importer") == wheels.wheel_name_version("lazy_importer-0.1.0-py3-none-any.whl")[0]
    assert wheels.torch_pin_problem(["numpy", "torch<3,>=2.4"]) is None
    assert wheels.torch_pin_problem(["torch==2.14.1"]) == "needs torch==2.14.1, the GPU image has torch 2.11.0"
    for name in ("diffusers-0.42.1-py3-none-any.whl", "diffusers-0.41.0-py3-none-any.whl", "other-1.0-py3-none-any.whl"):
        with zipfile.ZipFile(tmp_path / name, "w") as archive:
            archive.writestr(f"{name.split('-')[0]}.dist-info/METADATA",
                             "Name: x\nRequires-Dist: torch>=2.12\nRequires-Dist: pytest; extra == 'test'\n")
    assert [p.name for p in wheels.stale_wheels(tmp_path)] == ["diffusers-0.41.0-py3-none-any.whl", "other-1.0-py3-none-any.whl"]
    assert wheels.requires(tmp_path / "diffusers-0.42.1-py3-none-any.whl") == ["torch>=2.12"]
    problems = wheels.check_wheels(sorted(tmp_path.glob("*.whl")))
    assert "diffusers==0.42.1: 2 wheels in the folder, expected 1" in problems
    assert any("needs torch>=2.12" in p for p in problems)
    command = wheels.download_command(wheels.WHEELS[0], tmp_path)
    assert command[-1] == "diffusers==0.42.1" and "--no-deps" in command and command[command.index("--python-version") + 1] == "3.12"
    assert "manylinux2014_x86_64" in command
    report = wheels.size_report(sorted(tmp_path.glob("*.whl")), 70 * 2**20)
    assert report.endswith("does NOT fit in one device call's 64 MiB")


# --- the no-CUDA branch -----------------------------------------------------------------------------


@no_cuda
def test_without_cuda_the_check_says_so_in_one_line_and_exits_0(tmp_path, capsys):
    assert gpu_check.main([str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out == gpu_check.NO_CUDA + "\n"
    assert not (tmp_path / "out").exists()
    assert gpu_table.main(["--out", str(tmp_path / "t.json")]) == 0
    assert "no CUDA device here" in capsys.readouterr().out and not (tmp_path / "t.json").exists()


@no_cuda
def test_the_shell_script_without_cuda(tmp_path):
    result = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), str(tmp_path / "out")], capture_output=True,
                            text=True, env={**os.environ, "PYTHON": sys.executable}, timeout=120)
    assert result.returncode == 0 and result.stdout == gpu_check.NO_CUDA + "\n"
    assert not (tmp_path / "out").exists()


# --- the CUDA code paths that run on a CPU ----------------------------------------------------------


def test_table_rows_on_the_tiny_models_on_cpu(one_thread):
    bench = gpu_table.Bench(torch.device("cpu"))
    rows = [
        bench.measure(Setting("tiny", "bf16", True, "sdpa", "AdamW8bit", 1), "CAT sequential", steps=1, warmup=1),
        bench.measure(Setting("tiny", "fp16", False, "sdpa", "AdamW", 2), "CAT batched", steps=1, warmup=0),
        bench.measure(Setting("tiny", "fp16", True, "xformers", "AdamW", 1), "plain LoRA", steps=1, warmup=0),
        bench.measure(Setting("tiny_sdxl", "bf16", True, "sdpa", "AdamW", 1), "plain LoRA", steps=1, warmup=0),
        bench.measure(Setting("tiny_flux", "bf16", True, "sdpa", "AdamW", 1), "CAT sequential", steps=1, warmup=0),
        bench.measure(Setting("tiny_flux", "fp8", True, "sdpa", "AdamW", 1), "CAT sequential", steps=1, warmup=0),
    ]
    fp8_weights = {m.weight.dtype for m in bench.parts.unet.modules() if isinstance(m, torch.nn.Linear)}
    bench.release()
    assert [r["status"] for r in rows] == ["ok", "ok", "skipped", "ok", "ok", "ok"], [r["reason"] for r in rows]
    assert rows[2]["reason"] == "xformers needs CUDA" and fp8_weights == {torch.float8_e4m3fn}
    for row in (rows[0], rows[1], rows[3], rows[4], rows[5]):
        assert row["seconds"] > 0 and row["peak_allocated_bytes"] is None and row["lora_params"] > 0


@no_cuda  # with CUDA the GPU tests would run for real inside it
def test_the_whole_check_runs_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "out"
    argv = [str(out), "--device", "cpu", "--models", "tiny", "--budget", "240",
            "--table_args=--max_settings 1 --steps 1 --warmup 0 --precisions bf16"]
    assert gpu_check.main(argv) == 0
    report = json.loads((out / "gpu_check.json").read_text())
    tests = report["tests"]
    assert tests["status"] == "ran" and tests["failed"] == 0 and tests["passed"] == 0
    assert tests["skipped"] == len(tests["results"]) >= 10, "every GPU test is collected, and skipped without CUDA"
    rows = report["table"]["rows"]
    assert [r["method"] for r in rows] == list(gpu_table.METHODS) and all(r["status"] == "ok" for r in rows)
    assert report["table"]["stopped"] == "all 1 settings measured"
    text = (out / "gpu_check.md").read_text()
    assert "| tiny | 64 | 1 | bf16 | on | sdpa | AdamW8bit | CAT sequential |" in text
    assert {p.name for p in out.iterdir()} >= {"gpu_check.md", "gpu_check.json", "gpu_tests.log", "gpu_table.log"}
