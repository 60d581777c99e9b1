"""bench/wheelhouse.py: the wheels bench/gpu.sh carries to a GPU machine that has no network, its own Python 3.12
and CUDA torch (and numpy, Pillow, matplotlib), but no hydra-core, omegaconf or diffusers.

The wheelhouse is built once per session from PyPI (``bench/wheelhouse.py build``, what ``make wheelhouse`` runs;
about 40 s), or taken from ``BIGDIT_WHEELHOUSE=<dir>``; every test here is marked slow (about 100 s in all).
Without network the build fails and the tests skip, except under CI, where they fail. The checks on its contents
need no torch. The last test installs it into a clean Python 3.12 virtual environment (~/.pyenv/versions/3.12*,
skipped when absent) in which stand-in distributions (a few files each, built here) play the image's torch and
matplotlib, and PyPI's numpy and Pillow its own: pip resolves the benchmark's requirements from the wheelhouse
alone (``--no-index``) without touching them, the install step of bench/gpu.sh installs the rest, what imports
without torch imports, and hydra composes a benchmark row's training config. It imports neither diffusers nor
bigdit (both import torch) and runs no benchmark row: that needs a real torch (bench/RESULTS.md says how that
was checked).
"""

from __future__ import annotations

import ast
import base64
import glob
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
from packaging.tags import Tag, cpython_tags, compatible_tags
from packaging.utils import canonicalize_name, parse_wheel_filename

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import wheelhouse as wh  # noqa: E402

pytestmark = pytest.mark.slow  # every test here needs the built wheelhouse (pip, ~40 s once per session)

#: what a wheelhouse must hold whatever the pins: the rows' own imports and what those import
MUST_HAVE = {"hydra-core", "omegaconf", "antlr4-python3-runtime", "pyyaml", "diffusers", "huggingface-hub",
             "safetensors", "regex", "requests", "filelock", "importlib-metadata", "tqdm", "packaging"}
#: CPython 3.12 on Linux x86_64 with glibc 2.28 or newer (the GPU image's is newer; torch's own wheel is 2.28)
PLATFORMS = [f"manylinux_2_{minor}_x86_64" for minor in range(28, 4, -1)] + ["manylinux2014_x86_64",
                                                                             "manylinux2010_x86_64",
                                                                             "manylinux1_x86_64"]
CP312_TAGS = set(cpython_tags((3, 12), platforms=PLATFORMS)) | set(compatible_tags((3, 12), "cp312", PLATFORMS))


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory) -> Path:
    if os.environ.get("BIGDIT_WHEELHOUSE"):
        return Path(os.environ["BIGDIT_WHEELHOUSE"])
    out = tmp_path_factory.mktemp("wheelhouse")
    proc = subprocess.run([sys.executable, "bench/wheelhouse.py", "build", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    if proc.returncode:
        offline = any(s in proc.stderr for s in ("Failed to establish a new connection", "Network is unreachable",
                                                 "Temporary failure in name resolution", "No matching distribution"))
        if offline and not os.environ.get("CI"):
            pytest.skip(f"no package index to build the wheelhouse from: {proc.stderr.strip().splitlines()[-1]}")
        pytest.fail(f"bench/wheelhouse.py build failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return out


def wheels(wheelhouse: Path) -> dict[str, Path]:
    return {canonicalize_name(parse_wheel_filename(w.name)[0]): w for w in wheelhouse.glob("*.whl")}


def test_wheelhouse_holds_every_distribution_for_cp312_and_no_torch(wheelhouse):
    found = wheels(wheelhouse)
    assert len(found) == len(list(wheelhouse.glob("*.whl")))  # one version of each
    assert MUST_HAVE <= set(found), MUST_HAVE - set(found)
    for name, w in found.items():
        tags = parse_wheel_filename(w.name)[3]
        assert tags & CP312_TAGS, f"{w.name} does not install on CPython 3.12 x86_64"
        assert not wh.never_carried(name) and name not in wh.FROM_IMAGE, w.name
        assert not name.startswith("nvidia-") and name not in ("torch", "triton"), w.name
    assert parse_wheel_filename(found["antlr4-python3-runtime"].name)[3] == {Tag("py3", "none", "any")}  # built here
    pins = wh.pins()
    for name, w in found.items():  # constraints.txt's versions, where it pins them
        assert name not in pins or str(parse_wheel_filename(w.name)[1]) == pins[name], (w.name, pins[name])
    total = sum(w.stat().st_size for w in found.values())
    assert total < 64 * 2**20, f"{total / 2**20:.1f} MiB"
    # Every requirement (markers for 3.12 / Linux) met by another wheel at a matching version, or by the image.
    assert wh.check(wheelhouse) == []
    manifest = json.loads((wheelhouse / "wheelhouse.json").read_text())
    assert sorted(w["file"] for w in manifest["wheels"]) == sorted(w.name for w in found.values())
    assert manifest["total_bytes"] == total and manifest["python"] == "3.12" and manifest["commit"]
    assert set(manifest["from_image"]) >= {"torch", "numpy", "pillow", "matplotlib"}


def row_imports() -> set[str]:
    """The top-level modules the benchmark rows import: every import of tools/bench_{train,encode,sample}.py and the
    module-level imports of every bigdit module they (and ``python -m bigdit.train``) import, followed through
    bigdit. Imports inside bigdit's functions belong to the paths that call them (deepspeed, MDS, W&B, ...)."""
    def bigdit_files(dotted: str) -> list[Path]:
        parts, out = dotted.split("."), []
        for i in range(1, len(parts) + 1):
            base = REPO.joinpath(*parts[:i])
            out += [p for p in (base.with_suffix(".py"), base / "__init__.py") if p.is_file()]
        return out

    def imports(path: Path, everywhere: bool) -> set[str]:
        found = set()
        package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
        todo = list(ast.parse(path.read_text()).body)
        while todo:
            node = todo.pop()
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the file's package, one level up per extra dot
                    parents = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parents + ([base] if base else []))
                found |= {base} | {f"{base}.{a.name}" for a in node.names}
            if everywhere or not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                todo += list(ast.iter_child_nodes(node))
        return found

    modules, seen = set(), set()
    todo = [(REPO / "tools" / f"bench_{t}.py", True) for t in ("train", "encode", "sample")]
    todo += [(REPO / "bigdit" / "train.py", False)]
    while todo:
        path, everywhere = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in imports(path, everywhere):
            if name.split(".")[0] == "bigdit":
                todo += [(p, False) for p in bigdit_files(name)]
            elif name:
                modules.add(name.split(".")[0])
    return modules - set(sys.stdlib_module_names) - {"__future__"}


def test_wheelhouse_covers_what_the_benchmark_rows_import(wheelhouse):
    """Each third-party module the rows import (:func:`row_imports`) comes from the wheelhouse or the image."""
    modules = row_imports()
    assert {"torch", "hydra", "omegaconf", "numpy", "diffusers"} <= modules, modules
    owners = packages_distributions()
    found = set(wheels(wheelhouse)) | {"torch", *wh.FROM_IMAGE}
    uncovered = {m: sorted(owners.get(m, [m])) for m in sorted(modules)
                 if not {canonicalize_name(d) for d in owners.get(m, [m])} & found}
    assert not uncovered, f"the rows import these, which neither the wheelhouse nor the image has: {uncovered}"


def stand_in_wheel(out: Path, name: str, version: str, module: str, body: str) -> Path:
    """A minimal wheel of distribution ``name`` whose one module ``module`` is ``body``: it satisfies pip and
    importlib.metadata as the image's real one would, without its megabytes."""
    dist_info = f"{name}-{version}.dist-info"
    files = {f"{module}/__init__.py": body,
             f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test_wheelhouse\nRoot-Is-Purelib: true\n"
                                   "Tag: py3-none-any\n"}
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    files[f"{dist_info}/RECORD"] = "\n".join([*record, f"{dist_info}/RECORD,,"]) + "\n"
    wheel = out / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for path, text in files.items():
            z.writestr(path, text)
    return wheel


def test_clean_python312_installs_the_benchmark_from_the_wheelhouse_alone(wheelhouse, tmp_path):
    pythons = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.12*/bin/python")))
    if not pythons:
        pytest.skip("no Python 3.12 at ~/.pyenv/versions/3.12*/bin/python (the GPU machine's version)")
    venv = tmp_path / "venv"
    subprocess.run([pythons[-1], "-m", "venv", str(venv)], check=True, timeout=120)
    py = str(venv / "bin" / "python")

    def run(*args, env=None, check=True):
        proc = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                              env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", **(env or {})})
        assert not check or proc.returncode == 0, f"{args}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc

    # The image: its torch and matplotlib as stand-ins (importing the stand-in torch fails, on purpose), numpy and
    # Pillow from the package index. Nothing else: no packaging, PyYAML, filelock, typing-extensions.
    stand_ins = tmp_path / "stand-ins"
    stand_ins.mkdir()
    raise_ = 'raise ImportError("a stand-in for the GPU image\'s {}: dependency resolution only")\n'
    run(py, "-m", "pip", "install", "-q", "--no-deps",
        str(stand_in_wheel(stand_ins, "torch", "2.11.0", "torch", raise_.format("torch"))),
        str(stand_in_wheel(stand_ins, "matplotlib", "3.10.0", "matplotlib", raise_.format("matplotlib"))))
    run(py, "-m", "pip", "install", "-q", "numpy", "pillow")
    before = run(py, "-m", "pip", "freeze").stdout

    # pip alone, no index: the benchmark's requirements resolve from the wheelhouse and leave the image's alone.
    report = tmp_path / "report.json"
    run(py, "-m", "pip", "install", "--dry-run", "--no-index", "--find-links", str(wheelhouse), "--report",
        str(report), "-q", *wh.ROOTS)
    would = {canonicalize_name(i["metadata"]["name"]) for i in json.loads(report.read_text())["install"]}
    assert would <= set(wheels(wheelhouse)), would - set(wheels(wheelhouse))
    assert MUST_HAVE <= would and not would & {"torch", "numpy", "pillow", "matplotlib"}, would

    # bench/gpu.sh's install step: only what this Python lacks, into a folder of its own; again, nothing to do.
    site = tmp_path / "site"
    first = run(py, str(REPO / "bench" / "wheelhouse.py"), "install", "--wheelhouse", str(wheelhouse),
                "--target", str(site))
    assert "wheelhouse: installed " in first.stdout and "diffusers 0.39.0" in first.stdout, first.stdout
    env = {"PYTHONPATH": f"{REPO}{os.pathsep}{site}"}
    again = run(py, str(REPO / "bench" / "wheelhouse.py"), "install", "--wheelhouse", str(wheelhouse),
                "--target", str(site), env=env)
    assert "nothing to install" in again.stdout, again.stdout
    assert run(py, "-m", "pip", "freeze").stdout == before  # the environment itself is untouched

    # On 3.12, without torch: what the rows import that does not import torch itself imports (diffusers does import
    # torch on import: pip's resolution above is its check here), and hydra composes the config of a row.
    check = f"""
import antlr4, huggingface_hub, hydra, importlib_metadata, omegaconf, regex, requests, safetensors, tqdm, yaml
from importlib.metadata import version
from hydra import compose, initialize_config_dir
with initialize_config_dir({str(REPO / "configs")!r}, version_base=None):
    cfg = compose("train", overrides="model=dit model.name=DiT-XL/2 data=synthetic run.precision=bf16 run.compile=true "
                  "run.global_batch=256 run.activation_checkpointing=true run.steps=30".split())
print(version("diffusers"), cfg.model.name, cfg.run.global_batch, cfg.data.source.shape)
"""
    out = run(py, "-c", check, env=env).stdout.split()
    assert out == [wh.pins()["diffusers"], "DiT-XL/2", "256", "[4,", "32,", "32]"], out
