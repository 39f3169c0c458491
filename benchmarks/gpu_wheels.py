"""Wheels for a GPU machine that has CUDA torch but no internet: the toolkit's pinned libraries, nothing heavy.

    make gpu-wheels                 # here, where PyPI is reachable: fills .whl/ (git-ignored; about 31 MB)
    bash benchmarks/gpu_device.sh   # there, with .whl carried beside the repo: installs them, runs the GPU checks

A CUDA image typically holds torch, numpy, scipy, pandas, scikit-learn and pillow, but not Opacus, and other
versions of transformers / peft / huggingface_hub than the ones this toolkit is tested with. This script asks
pip for the whole dependency closure of the pins in ``requirements.txt`` (transformers, peft, opacus, imagehash)
for the target interpreter and platform (default CPython 3.12, manylinux x86-64) without installing anything,
leaves out what the image brings (:data:`IMAGE_PROVIDES`: torch and its CUDA stack, numpy, scipy, ...), and downloads the rest
with ``--no-deps``: the exact versions CI runs, so the first GPU run cannot fail on a missing module or an API
difference. It prints what it fetched and fails if the folder would not travel (over ``--max-mb``).
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PINNED = ("transformers", "peft", "opacus", "imagehash")   # imagehash: the training path checks image overlaps
# Brought by a CUDA PyTorch image (and too large to carry): torch's own stack and the scientific base.
IMAGE_PROVIDES = ("torch", "triton", "numpy", "scipy", "sympy", "mpmath", "networkx", "setuptools", "jinja2",
                  "markupsafe", "psutil", "pillow", "hf-xet")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(requirements: Path = ROOT / "requirements.txt") -> list[str]:
    """``name==version`` of :data:`PINNED` as ``requirements.txt`` pins them (one place for the versions)."""
    found = {}
    for line in requirements.read_text().splitlines():
        spec = line.split("#")[0].strip()
        if "==" in spec and normalize(spec.split("==")[0]) in PINNED:
            found[normalize(spec.split("==")[0])] = spec
    missing = [name for name in PINNED if name not in found]
    if missing:
        raise SystemExit(f"requirements.txt pins no version of {missing}: the GPU machine needs exact versions")
    return [found[name] for name in PINNED]


def target_args(python_version: str) -> list[str]:
    args = ["--python-version", python_version, "--implementation", "cp", "--only-binary=:all:"]
    for platform in PLATFORMS:
        args += ["--platform", platform]
    return args


def closure(requirements: list[str], python_version: str) -> list[tuple[str, str]]:
    """(name, version) of everything pip would install for ``requirements`` on the target, resolved, not fetched."""
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "report.json"
        _pip(["install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report),
              "--target", str(Path(scratch) / "target"), *target_args(python_version), *requirements],
             f"resolve {' '.join(requirements)} for Python {python_version}")
        items = json.loads(report.read_text())["install"]
    return [(item["metadata"]["name"], item["metadata"]["version"]) for item in items]


def carried(resolved: list[tuple[str, str]]) -> list[str]:
    """The resolved packages the image does not bring (torch's CUDA libraries are ``nvidia-*`` and ``cuda-*``)."""
    return [f"{name}=={version}" for name, version in resolved
            if normalize(name) not in IMAGE_PROVIDES and not normalize(name).startswith(("nvidia-", "cuda-"))]


def _pip(args: list[str], what: str) -> None:
    try:
        subprocess.run([sys.executable, "-m", "pip", *args], check=True)
    except subprocess.CalledProcessError as err:   # pip said why above; say what it was doing
        raise SystemExit(f"pip could not {what} (exit {err.returncode}; is PyPI reachable from here?)") from None


def check_imported_versions() -> str:
    """On the device, after the install: the pinned libraries this interpreter imports must be the pinned versions
    (a stale .whl/ or an image copy shadowing them would run untested code). Returns a line saying what runs."""
    import torch   # here, not at the top: the download side (make gpu-wheels) needs no torch

    want = dict(spec.split("==") for spec in pins())
    got = {name: __import__(name).__version__ for name in want}
    wrong = {name: (got[name], version) for name, version in want.items() if got[name] != version}
    if wrong:
        raise SystemExit(f"imported versions differ from requirements.txt (imported, pinned): {wrong}; "
                         "is .whl stale? run make gpu-wheels")
    return (f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}, available: "
            f"{torch.cuda.is_available()}), " + ", ".join(f"{k} {v}" for k, v in got.items()))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check-imported", action="store_true",
                        help="on the device: check the imported versions against the pins, download nothing")
    parser.add_argument("--out", type=Path, default=ROOT / ".whl")
    parser.add_argument("--python-version", default="3.12", help="the GPU machine's Python (default 3.12)")
    parser.add_argument("--max-mb", type=float, default=40.0, help="fail above this (the carried tree's budget)")
    args = parser.parse_args(argv)
    if args.check_imported:
        print(check_imported_versions())
        return
    wanted = carried(closure(pins(), args.python_version))
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.out) as fresh:   # the old set stays until the new one is complete
        _pip(["download", "--quiet", "--no-deps", "-d", fresh, *target_args(args.python_version), *wanted],
             f"download {len(wanted)} wheels")
        for old in args.out.glob("*.whl"):   # one version of each: two would stop the install there
            old.unlink()
        for wheel in Path(fresh).glob("*.whl"):
            wheel.replace(args.out / wheel.name)
    wheels = sorted(args.out.glob("*.whl"))
    size_mb = sum(w.stat().st_size for w in wheels) / 2 ** 20
    print("\n".join(f"  {w.name}" for w in wheels))
    print(f"{len(wheels)} wheels, {size_mb:.1f} MB in {args.out} (left to the image: {', '.join(IMAGE_PROVIDES)}, "
          f"nvidia-*, cuda-*)")
    if size_mb > args.max_mb:
        raise SystemExit(f"{size_mb:.1f} MB of wheels is over --max-mb {args.max_mb:g}")


if __name__ == "__main__":
    main()
