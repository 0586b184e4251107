"""Download, on a machine with network, the wheels that the GPU machine's image lacks, into `.whl/`.

    .venv/bin/python -m bench.fetch_gpu_wheels [--dest .whl] [--no_install_check]

The GPU image (Python 3.12, torch 2.11 for CUDA 13, transformers, accelerate, peft, safetensors, timm,
torchvision, ...) has no network. `bench/gpu_check.sh` installs these wheels there with
`pip install --no-index --no-deps`, so every dependency the image lacks is named here. Versions are
requirements.txt's where it pins the package; the others are what those need. Each wheel's torch
requirement is checked against the image's torch, and the total against what one device call may
carry (64 MiB, the working tree included). transformers 5.23 (13 MB) does not fit beside
bitsandbytes (43 MB): the image's own transformers is used there.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
IMAGE_TORCH = "2.11.0"
CARRY_LIMIT = 64 * 2**20  # bytes one device call may carry, working tree and wheels together


@dataclass(frozen=True)
class Wheel:
    name: str  # as pip knows it
    version: str
    why: str


WHEELS = (
    Wheel("diffusers", "0.42.1", "U-Net, VAE, schedulers, pipelines"),
    Wheel("importlib_metadata", "10.2.0", "diffusers needs it"),
    Wheel("lazy-importer", "0.1.0", "importlib_metadata 10 needs it"),
    Wheel("ftfy", "6.3.1", "CLIP's text cleaning (library/families/clip_tokenizer.py)"),
    Wheel("wcwidth", "0.9.4", "ftfy needs it"),
    Wheel("toml", "0.10.2", "lycoris-lora needs it"),
    Wheel("bitsandbytes", "0.50.2", "8-bit optimizers (has CUDA 13.0 kernels)"),
    Wheel("xformers", "0.0.35", "--xformers attention (needs torch>=2.10; not in requirements.txt: GPU only)"),
    Wheel("open_clip_torch", "3.3.0", "KPS scoring; needs timm and torchvision, which the image has"),
)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="download the GPU image's missing wheels into .whl/")
    parser.add_argument("--dest", type=Path, default=REPO / ".whl")
    parser.add_argument("--no_install_check", action="store_true",
                        help="skip installing the wheels into a clean temporary folder afterwards")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.dest.mkdir(parents=True, exist_ok=True)
    for wheel in WHEELS:
        subprocess.run(download_command(wheel, args.dest), check=True)
    for stale in stale_wheels(args.dest):  # two versions of one package stop the whole install there
        stale.unlink()
        print(f"removed {stale.name} (not in the list)")
    files = sorted(args.dest.glob("*.whl"))
    problems = check_wheels(files)
    print(size_report(files, tracked_bytes()))
    if not args.no_install_check:
        problems += install_check(files)
    for problem in problems:
        print(f"problem: {problem}", file=sys.stderr)
    return 1 if problems else 0


def download_command(wheel: Wheel, dest: Path) -> list[str]:
    """The device README's pip command: CPython 3.12 manylinux x86_64 wheels, no dependencies."""
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    return [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
            "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(dest),
            f"{wheel.name}=={wheel.version}"]


def normalized(name: str) -> str:
    """A distribution name as wheel files and pip compare it (PEP 503, with `_`)."""
    return re.sub(r"[-_.]+", "_", name).lower()


def wheel_name_version(filename: str) -> tuple[str, str]:
    """(normalized name, version) of a wheel file name."""
    name, version = filename.split("-")[:2]
    return normalized(name), version


def stale_wheels(folder: Path) -> list[Path]:
    """Wheels in `folder` that are not exactly one of WHEELS (another version, or another package)."""
    wanted = {(normalized(w.name), w.version) for w in WHEELS}
    return [path for path in sorted(folder.glob("*.whl")) if wheel_name_version(path.name) not in wanted]


def requires(wheel_file: Path) -> list[str]:
    """The Requires-Dist lines of a wheel's METADATA, without the optional (extra) ones."""
    with zipfile.ZipFile(wheel_file) as archive:
        metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        text = archive.read(metadata).decode()
    return [line.split(":", 1)[1].strip() for line in text.splitlines()
            if line.startswith("Requires-Dist:") and "extra ==" not in line]


def torch_pin_problem(requirements: list[str], torch_version: str = IMAGE_TORCH) -> str | None:
    """Why a wheel's torch requirement excludes `torch_version`, or None."""
    from packaging.requirements import Requirement

    for line in requirements:
        requirement = Requirement(line)
        if normalized(requirement.name) == "torch" and not requirement.specifier.contains(torch_version, prereleases=True):
            return f"needs {requirement}, the GPU image has torch {torch_version}"
    return None


def check_wheels(files: list[Path]) -> list[str]:
    """Exactly one wheel per listed package, each allowing the image's torch."""
    problems = []
    names = [wheel_name_version(f.name)[0] for f in files]
    for wheel in WHEELS:
        count = names.count(normalized(wheel.name))
        if count != 1:
            problems.append(f"{wheel.name}=={wheel.version}: {count} wheels in the folder, expected 1")
    for file in files:
        problem = torch_pin_problem(requires(file))
        if problem:
            problems.append(f"{file.name} {problem}")
    return problems


def tracked_bytes() -> int:
    """What the working tree sends with every device call: the tracked files (untracked ones are not counted)."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    return sum((REPO / name).stat().st_size for name in listed.decode().split("\0") if name and (REPO / name).is_file())


def size_report(files: list[Path], tree_bytes: int) -> str:
    """Each wheel's size, the total, and whether wheels and working tree fit in one call's carry."""
    lines = [f"{f.stat().st_size / 2**20:8.2f} MiB  {f.name}" for f in files]
    wheels = sum(f.stat().st_size for f in files)
    total = wheels + tree_bytes
    verdict = "fits" if total <= CARRY_LIMIT else "does NOT fit"
    lines.append(f"{wheels / 2**20:8.2f} MiB  wheels; with the working tree ({tree_bytes / 2**20:.2f} MiB): "
                 f"{total / 2**20:.2f} MiB, which {verdict} in one device call's {CARRY_LIMIT / 2**20:.0f} MiB")
    return "\n".join(lines)


def install_check(files: list[Path]) -> list[str]:
    """Install the wheels as the GPU machine will (no index, no dependencies) into a clean folder."""
    with tempfile.TemporaryDirectory() as target:
        result = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                                 "--no-compile", "--target", target, *map(str, files)], capture_output=True, text=True)
        if result.returncode != 0:
            return [f"pip install --no-index --no-deps --target failed: {result.stderr.strip()[-500:]}"]
        installed = {wheel_name_version(p.name.removesuffix(".dist-info"))[0] for p in Path(target).glob("*.dist-info")}
    missing = [w.name for w in WHEELS if normalized(w.name) not in installed]
    print(f"installed into a clean folder with --no-index --no-deps: {len(installed)} packages")
    return [f"not installed: {', '.join(missing)}"] if missing else []


if __name__ == "__main__":
    sys.exit(main())
