#!/usr/bin/env python
"""The wheels the GPU benchmark (bench/gpu.sh) needs on a machine without network, and their install there.

    python bench/wheelhouse.py build [--out wheelhouse]      # here, with PyPI: what `make wheelhouse` runs
    python bench/wheelhouse.py check [--wheelhouse wheelhouse]
    python bench/wheelhouse.py install [--wheelhouse wheelhouse] [--target DIR]   # there (bench/gpu.sh does it)

The GPU machine has Python 3.12 and its own CUDA torch, numpy, Pillow and matplotlib, but not hydra-core,
omegaconf or diffusers (nor deepspeed, webdataset, mosaicml-streaming or submitit, which no benchmark row
imports: the rows train with DDP on one process from synthetic data, encode with diffusers' AutoencoderKL
and sample with bigdit.inference). ``build`` downloads, for CPython 3.12 on manylinux x86_64, the wheels of
:data:`ROOTS` and of everything they require (markers evaluated for that Python), at the versions pinned in
constraints.txt, except torch and its CUDA stack (:func:`never_carried`) and :data:`FROM_IMAGE` (large
packages every torch image has). A requirement with no wheel on the index (antlr4-python3-runtime 4.9.3,
hydra's pin) is built here with ``pip wheel --no-deps``; it must come out pure Python. ``build`` also writes
``wheelhouse.json``: the wheels, what is left to the image, the commit it was built at (bench/gpu.sh records
it when the GPU machine's copy has no git) and the total size.

``install`` uses the standard library and pip only. It installs, with ``pip install --no-index --no-deps
--target DIR``, only the wheels whose distribution the running Python lacks, so nothing the image has is
replaced or shadowed and its torch is never touched; DIR then goes on PYTHONPATH (bench/gpu.sh does that).
It fails, naming them, when something from :data:`FROM_IMAGE` or torch is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
#: what the benchmark rows import beyond the standard library, torch and FROM_IMAGE (bigdit.train: hydra,
#: omegaconf; tools/bench_encode.py: diffusers; bigdit.diffusion's progress bars: tqdm)
ROOTS = ("hydra-core", "omegaconf", "diffusers", "tqdm")
#: required by the rows but taken from the GPU image (any torch image has them; together ~30 MiB of wheels)
FROM_IMAGE = ("numpy", "pillow", "matplotlib")
PYTHON = "3.12"
#: the target interpreter's marker environment (PEP 508) for evaluating Requires-Dist
MARKERS = {"python_version": PYTHON, "python_full_version": PYTHON + ".3", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
           "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux_2_5_x86_64", "manylinux1_x86_64", "any")
MAX_BYTES = 64 * 2**20  # what travels to the GPU machine with the working tree, all of it


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def never_carried(name: str) -> bool:
    """torch and its CUDA stack: the GPU machine's own must stay."""
    name = canonical(name)
    return name in {"torch", "triton", "torchvision", "torchaudio"} or name.startswith(("nvidia-", "cuda-"))


def wheel_name(path: Path) -> tuple[str, str, str]:
    """(canonical distribution name, version, tags) of a wheel file."""
    parts = path.name[: -len(".whl")].split("-")
    return canonical(parts[0]), parts[1], "-".join(parts[-3:])


def fits_cp312_x86_64(tags: str) -> bool:
    """Whether a wheel's ``python-abi-platform`` tags install on CPython 3.12, Linux x86_64 (manylinux <= 2.28)."""
    pythons, abis, platforms = (set(t.split(".")) for t in tags.split("-"))
    python_ok = bool(pythons & {"py3", "py2.py3", "cp312"}) or any(
        re.fullmatch(r"cp3(\d+)", p) and int(p[3:]) <= 12 and "abi3" in abis for p in pythons)
    abi_ok = bool(abis & {"none", "abi3", "cp312"})

    def platform_ok(p: str) -> bool:
        if p == "any":
            return True
        m = re.fullmatch(r"manylinux_(\d+)_(\d+)_x86_64", p)
        if m:
            return (int(m[1]), int(m[2])) <= (2, 28)
        return p in {"manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"}

    return python_ok and abi_ok and any(platform_ok(p) for p in platforms)


def pins(path: Path = REPO / "constraints.txt") -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            out[canonical(name)] = version.strip()
    return out


def requirements(wheel: Path, extras: frozenset[str] = frozenset()) -> list[str]:
    """The Requires-Dist lines of a wheel that apply on CPython 3.12 / Linux x86_64 with ``extras``."""
    from packaging.requirements import Requirement  # build and check only (the install side needs no packaging)

    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    out = []
    for line in lines:
        if not line:
            break  # headers end at the first blank line
        if line.startswith("Requires-Dist:"):
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker is None or any(req.marker.evaluate({**MARKERS, "extra": e}) for e in {"", *extras}):
                out.append(str(req))
    return out


def pip(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
                          capture_output=True, text=True, **kw)


def fetch(name: str, spec: str, out: Path) -> Path:
    """Download the cp312/manylinux wheel of ``name`` at its pin (else the newest matching ``spec``); build it
    here with ``pip wheel --no-deps`` when the index has no wheel (it must come out pure Python)."""
    pin = pins().get(canonical(name))
    want = f"{name}=={pin}" if pin else f"{name}{spec}"
    before = set(out.glob("*.whl"))
    platform_args = [a for p in PLATFORMS for a in ("--platform", p)]
    proc = pip("download", "--no-deps", "--only-binary=:all:", "--python-version", PYTHON, "--implementation", "cp",
               *platform_args, "-d", str(out), want)
    if proc.returncode:
        proc = pip("wheel", "--no-deps", "-w", str(out), want, env={**os.environ, "DS_BUILD_OPS": "0"})
        if proc.returncode:
            sys.exit(f"wheelhouse: neither a {PYTHON} wheel nor a build of {want}:\n{proc.stderr[-3000:]}")
    new = [w for w in set(out.glob("*.whl")) - before if wheel_name(w)[0] == canonical(name)]
    wheel = new[0] if new else next(w for w in out.glob("*.whl") if wheel_name(w)[0] == canonical(name))
    if not fits_cp312_x86_64(wheel_name(wheel)[2]):
        sys.exit(f"wheelhouse: {wheel.name} does not install on CPython {PYTHON} x86_64")
    return wheel


def git_commit() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=REPO).returncode != 0
    except FileNotFoundError:
        return "unknown"
    return (commit + ("+dirty" if dirty else "")) if commit else "unknown"


def build(out: Path) -> dict:
    """Fill ``out`` with the closure of :data:`ROOTS` (see the module docstring); returns wheelhouse.json."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.whl"):
        stale.unlink()
    wheels: dict[str, Path] = {}
    done_extras: dict[str, frozenset[str]] = {}
    needed_by: dict[str, set[str]] = {}
    image: dict[str, set[str]] = {name: {"bigdit"} for name in ("torch", *FROM_IMAGE)}
    queue = [(Requirement(root), "benchmark") for root in ROOTS]
    while queue:
        req, parent = queue.pop(0)
        key = canonical(req.name)
        if never_carried(key) or key in FROM_IMAGE:
            image.setdefault(key + str(req.specifier), set()).add(parent)
            continue
        needed_by.setdefault(key, set()).add(parent)
        if key not in wheels:
            wheels[key] = fetch(req.name, str(req.specifier), out)
            print(f"wheelhouse: {wheels[key].name}", flush=True)
        if Version(wheel_name(wheels[key])[1]) not in req.specifier:
            sys.exit(f"wheelhouse: {parent} needs {req}, the wheelhouse has {wheels[key].name} (constraints.txt "
                     f"pins it)")
        extras = done_extras.get(key, frozenset()) | frozenset(req.extras)
        if key in done_extras and extras == done_extras[key]:
            continue
        done_extras[key] = extras
        queue += [(Requirement(r), key) for r in requirements(wheels[key], extras)]
    manifest = {
        "python": PYTHON, "platforms": list(PLATFORMS), "roots": list(ROOTS), "commit": git_commit(),
        "wheels": [{"file": w.name, "name": k, "version": wheel_name(w)[1], "bytes": w.stat().st_size,
                    "needed_by": sorted(needed_by[k])} for k, w in sorted(wheels.items())],
        "from_image": {req: sorted(parents) for req, parents in sorted(image.items())},
        "total_bytes": sum(w.stat().st_size for w in wheels.values()),
    }
    (out / "wheelhouse.json").write_text(json.dumps(manifest, indent=1) + "\n")
    problems = check(out)
    if problems:
        sys.exit("wheelhouse: " + "; ".join(problems))
    return manifest


def check(wheelhouse: Path) -> list[str]:
    """What is wrong with a built wheelhouse (empty: nothing): a wheel that does not install on CPython 3.12
    x86_64, torch or its CUDA stack, two versions of one distribution, a requirement of a wheel that neither
    another wheel nor the image (FROM_IMAGE, torch) satisfies, or a size over :data:`MAX_BYTES`."""
    from packaging.requirements import Requirement

    problems = []
    found = {}
    for w in sorted(wheelhouse.glob("*.whl")):
        name, version, tags = wheel_name(w)
        if never_carried(name):
            problems.append(f"{w.name} must not be carried (the GPU machine's own torch stays)")
        if not fits_cp312_x86_64(tags):
            problems.append(f"{w.name} does not install on CPython {PYTHON} x86_64")
        if name in found:
            problems.append(f"two versions of {name}: {found[name].name}, {w.name}")
        found[name] = w
    # Resolve ROOTS against the wheels alone, as pip would with --no-index (the image supplying FROM_IMAGE).
    queue, seen = [(Requirement(root), "benchmark") for root in ROOTS], set()
    while queue:
        req, parent = queue.pop(0)
        key = canonical(req.name)
        if never_carried(key) or key in FROM_IMAGE:
            continue
        if key not in found:
            problems.append(f"{parent} requires {req}, which is not in the wheelhouse")
            continue
        if wheel_name(found[key])[1] not in req.specifier:
            problems.append(f"{parent} requires {req}, the wheelhouse has {found[key].name}")
        if (key, frozenset(req.extras)) not in seen:
            seen.add((key, frozenset(req.extras)))
            queue += [(Requirement(r), key) for r in requirements(found[key], frozenset(req.extras))]
    total = sum(w.stat().st_size for w in found.values())
    if total > MAX_BYTES:
        problems.append(f"{total / 2**20:.1f} MiB of wheels, over {MAX_BYTES / 2**20:.0f} MiB")
    return problems


def installed(name: str) -> bool:
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        distribution(name)
        return True
    except PackageNotFoundError:
        return False


def install(wheelhouse: Path, target: Path) -> int:
    """Install (``--no-index --no-deps --target``) the wheels whose distribution this Python lacks; see the module
    docstring. Returns an exit code."""
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    missing_image = [n for n in ("torch", *FROM_IMAGE) if not installed(n)]
    if missing_image:
        print(f"wheelhouse: this Python lacks {', '.join(missing_image)}, which the wheelhouse leaves to the "
              f"machine's image (bench/wheelhouse.py FROM_IMAGE)", file=sys.stderr)
        return 1
    wheels = sorted(wheelhouse.glob("*.whl"))
    carried = [w for w in wheels if never_carried(wheel_name(w)[0])]
    if carried:
        print(f"wheelhouse: refusing to install {', '.join(w.name for w in carried)}", file=sys.stderr)
        return 1
    todo = [w for w in wheels if not installed(wheel_name(w)[0])]
    if not todo:
        print(f"wheelhouse: nothing to install ({len(wheels)} distributions already present)", flush=True)
        return 0
    if here != PYTHON:
        print(f"wheelhouse: built for Python {PYTHON}, this is {here}; missing: "
              f"{', '.join(wheel_name(w)[0] for w in todo)}", file=sys.stderr)
        return 1
    target.mkdir(parents=True, exist_ok=True)
    proc = pip("install", "--no-index", "--no-deps", "--no-compile", "--target", str(target), *map(str, todo))
    if proc.returncode:
        print(f"wheelhouse: pip install failed:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}", file=sys.stderr)
        return 1
    print(f"wheelhouse: installed {', '.join(wheel_name(w)[0] + ' ' + wheel_name(w)[1] for w in todo)} into "
          f"{target} ({len(wheels) - len(todo)} already present)", flush=True)
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--out", type=Path, default=REPO / "wheelhouse")
    c = sub.add_parser("check")
    c.add_argument("--wheelhouse", type=Path, default=REPO / "wheelhouse")
    i = sub.add_parser("install")
    i.add_argument("--wheelhouse", type=Path, default=REPO / "wheelhouse")
    i.add_argument("--target", type=Path, default=Path(tempfile.gettempdir()) / "bigdit-bench-site")
    args = parser.parse_args(argv)
    if args.cmd == "build":
        m = build(args.out)
        for w in m["wheels"]:
            print(f"{w['bytes'] / 2**20:8.2f} MiB  {w['file']}")
        print(f"{m['total_bytes'] / 2**20:8.2f} MiB  in {len(m['wheels'])} wheels -> {args.out}; from the image: "
              f"{', '.join(m['from_image'])}")
        return 0
    if args.cmd == "check":
        problems = check(args.wheelhouse)
        for p in problems:
            print(p, file=sys.stderr)
        return 1 if problems else 0
    return install(args.wheelhouse, args.target)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
