"""tools/shards.py: inspect, verify (corrupt/truncated shards, wrong shapes, NaN) and lossless convert."""

from __future__ import annotations

import io
import shutil
import sys
import tarfile

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from bigdit.data.npy import npy_bytes
from bigdit.train import CONFIG_DIR

from conftest import REPO

sys.path.insert(0, str(REPO / "tools"))
import encode_latents  # noqa: E402
import shards  # noqa: E402


@pytest.fixture(scope="module")
def wds_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits") / "wds"
    with initialize_config_dir(CONFIG_DIR, version_base=None):
        cfg = compose("encode_latents", overrides=["input=sklearn:digits", f"out={root}", "limit=60", "shard_size=20",
                                                   "num_workers=0", "progress=false"])
    encode_latents.run(cfg)
    return root


def test_inspect(wds_root):
    info = shards.inspect(str(wds_root))
    assert info["samples"] == 60 and info["shards"] == 3 and info["format"] == "wds"
    assert info["fields"]["moments"] == "float16[2, 8, 8]" and info["fields"]["moments_flip"] == "float16[2, 8, 8]"
    assert info["fields"]["cls"] == "int" and info["manifest"]["classes"] == [str(d) for d in range(10)]
    assert shards.main(["inspect", str(wds_root)]) == 0
    import webdataset  # the shards are plain WebDataset tars

    sample = next(iter(webdataset.WebDataset(str(wds_root / "shard-000000.tar"), shardshuffle=False).decode()))
    assert sample["moments.npy"].shape == (2, 8, 8) and 0 <= sample["cls"] <= 9


def test_convert_round_trip_is_lossless(wds_root, tmp_path):
    shards.convert(str(wds_root), str(tmp_path / "mds"), progress=False)
    assert shards.verify(str(tmp_path / "mds"), out=io.StringIO()) == 0
    from streaming import StreamingDataset
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()
    ds = StreamingDataset(local=str(tmp_path / "mds"), shuffle=False, batch_size=4)  # the root index.json
    assert len(ds) == 60 and ds[0]["moments"].shape == (2, 8, 8) and ds[0]["moments"].dtype == np.float16
    shards.convert(str(tmp_path / "mds"), str(tmp_path / "back"), progress=False)
    for n in ("shard-000000", "shard-000002"):
        assert (tmp_path / "back" / f"{n}.tar").read_bytes() == (wds_root / f"{n}.tar").read_bytes()


def rewrite_member(path, name: str, data: bytes) -> None:
    """Replace one tar member's bytes (a sample made bad on purpose)."""
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    with tarfile.open(path, "w") as tar:
        for m, d in members:
            d = data if m.name == name else d
            m.size = len(d)
            tar.addfile(m, io.BytesIO(d))


def test_verify_names_every_problem(wds_root, tmp_path):
    root = tmp_path / "bad"
    shutil.copytree(wds_root, root)
    assert shards.main(["verify", str(root)]) == 0
    with tarfile.open(root / "shard-000001.tar") as tar:
        keys = sorted({m.name.split(".")[0] for m in tar})
    nan = np.full((2, 8, 8), np.nan, np.float16)
    rewrite_member(root / "shard-000001.tar", f"{keys[0]}.moments.npy", npy_bytes(nan))
    rewrite_member(root / "shard-000001.tar", f"{keys[1]}.moments_flip.npy", npy_bytes(np.zeros((2, 4, 4), np.float16)))
    data = (root / "shard-000002.tar").read_bytes()
    (root / "shard-000002.tar").write_bytes(data[: len(data) // 2])  # truncated
    report = io.StringIO()
    assert shards.verify(str(root), out=report) >= 3
    text = report.getvalue()
    assert f"shard-000001: {keys[0]}: moments has NaN/inf values" in text
    assert f"shard-000001: {keys[1]}: moments_flip has shape (2, 4, 4)" in text
    assert "shard-000002" in text and "truncated" in text
    assert shards.main(["verify", str(root)]) == 1
