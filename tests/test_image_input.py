"""tools/encode_latents.py on WebDataset tar inputs read through the webdataset library: brace patterns,
``pipe:`` commands and http URLs give the shards local tars give, for any number of ranks and workers;
resuming redoes only missing shards; bad images are skipped and counted; bad specs are named."""

from __future__ import annotations

import functools
import http.server
import io
import json
import shutil
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from bigdit.train import CONFIG_DIR

from conftest import REPO, image

sys.path.insert(0, str(REPO / "tools"))
import encode_latents  # noqa: E402
import shards  # noqa: E402

PATTERN = "in-{000000..000002}.tar"


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    image(seed).save(buf, format="JPEG")
    return buf.getvalue()


def captioned(t: int, i: int) -> tuple[str, dict[str, bytes]]:
    key = f"{t:05d}{i:04d}"
    return key, {"jpg": jpeg(10 * t + i), "txt": f"photo {i} of tar {t}".encode(),
                 "json": json.dumps({"url": f"http://x/{key}"}).encode()}


@pytest.fixture(scope="module")
def tars(tmp_path_factory) -> Path:
    """Three img2dataset-style tars of 3 images each (a folder that holds nothing else)."""
    root = tmp_path_factory.mktemp("tars")
    for t in range(3):
        write_tar(root / f"in-{t:06d}.tar", [captioned(t, i) for i in range(3)])
    return root


def encode(capsys=None, **overrides):
    """One encoder process; a spec with braces goes in quotes (as on the command line)."""
    overrides = {"vae": "none", "resolution": 8, "flip": False, "shard_size": 2, "num_workers": 0, "progress": False,
                 **overrides}
    overrides["input"] = f"'{overrides['input']}'"
    with initialize_config_dir(CONFIG_DIR, version_base=None):
        cfg = compose("encode_latents", overrides=[f"{k}={v}" for k, v in overrides.items()])
    return encode_latents.run(cfg)


def samples(root: Path) -> list[dict]:
    manifest = json.loads((root / "manifest.json").read_text())
    return [s for n in manifest["shards"] for s in shards.shard_io(manifest["format"]).read_shard(root, n["name"])]


def assert_same(a: Path, b: Path) -> None:
    """The same manifest and, sample by sample, the same keys, captions and (uint8 pixel shards: vae=none) pixels."""
    assert json.loads((a / "manifest.json").read_text()) == json.loads((b / "manifest.json").read_text())
    x, y = samples(a), samples(b)
    assert [(s["key"], s["txt"]) for s in x] == [(s["key"], s["txt"]) for s in y]
    assert all(np.array_equal(s["pixels"], t["pixels"]) for s, t in zip(x, y))


def test_brace_pattern_any_ranks_and_workers_same_shards_and_resumable(tmp_path, tars):
    one = encode(input=tars / PATTERN, out=tmp_path / "one")
    # each tar's 3 samples are cut into its own shards of at most 2, in stream order
    assert [(s["name"], s["count"]) for s in one.shards] == [
        (f"shard-{t:06d}-{p:04d}", 2 - p) for t in range(3) for p in range(2)]
    got = samples(tmp_path / "one")
    assert [s["key"] for s in got] == [f"{t:05d}{i:04d}" for t in range(3) for i in range(3)]
    assert got[4]["txt"] == "photo 1 of tar 1" and got[4]["json"]["url"] == "http://x/000010001"
    assert shards.verify(str(tmp_path / "one"), out=io.StringIO()) == 0
    # a folder of tars is the same input
    encode(input=tars, out=tmp_path / "folder")
    assert_same(tmp_path / "folder", tmp_path / "one")

    # two ranks, each with two DataLoader workers streaming its tars: the same shards
    two = tmp_path / "two"
    assert encode(input=tars / PATTERN, out=two, rank=1, world_size=2, num_workers=2) is None
    assert sorted(p.name for p in (two / "inputs").iterdir()) == ["000001.json"]  # tar t: rank t % 2
    encode(input=tars / PATTERN, out=two, rank=0, world_size=2, num_workers=2)
    assert_same(two, tmp_path / "one")

    # a crash inside tar 2: its second shard is missing, so is the tar's record; the rerun redoes just that
    (two / "shard-000002-0001.tar").unlink()
    (two / "shard-000002-0001.json").unlink()
    (two / "inputs" / "000002.json").unlink()
    (two / "manifest.json").unlink()
    before = {p.name: p.stat().st_mtime_ns for p in two.glob("shard-*.tar")}
    encode(input=tars / PATTERN, out=two)
    assert_same(two, tmp_path / "one")
    assert all(two.joinpath(n).stat().st_mtime_ns == t for n, t in before.items())


def test_pipe_command_reads_what_the_file_gives(tmp_path, tars):
    path = tars / "in-000001.tar"
    encode(input=path, out=tmp_path / "file")
    encode(input=f"pipe:cat {path}", out=tmp_path / "pipe")
    assert_same(tmp_path / "pipe", tmp_path / "file")
    assert samples(tmp_path / "pipe")[0]["json"]["source"] == f"pipe:cat {path}"


def test_http_urls_through_a_local_server(tmp_path, tars):
    if shutil.which("curl") is None:
        pytest.skip("webdataset reads http:// with curl, which is not installed")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(tars)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{PATTERN}"
        encode(input=url, out=tmp_path / "http")
        encode(input=tars / PATTERN, out=tmp_path / "local")
        assert_same(tmp_path / "http", tmp_path / "local")
        with pytest.raises(OSError, match=r"cannot read input tar http://127.*/nope.tar \(the command exited with "
                                          r"status 22\); check it with `curl -fsSL"):
            encode(input=f"http://127.0.0.1:{server.server_address[1]}/nope.tar", out=tmp_path / "missing")
    finally:
        server.shutdown()


def test_bad_images_are_skipped_counted_and_listed(tmp_path, capsys):
    good = [captioned(0, i) for i in range(4)]
    corrupt = ("corrupt", {"jpg": jpeg(1)[:40] + b"\0" * 200, "txt": b"cut short"})
    noimage = ("noimage", {"txt": b"a caption without its image"})
    garbage = ("garbage", {"png": b"not an image"})
    write_tar(tmp_path / "bad.tar", [good[0], corrupt, good[1], noimage, garbage, good[2], good[3]])
    m = encode(input=tmp_path / "bad.tar", out=tmp_path / "out", shard_size=3)
    assert m.count == 4 and [s["count"] for s in m.shards] == [2, 1, 1]
    assert [s["key"] for s in samples(tmp_path / "out")] == [k for k, _ in good]
    record = json.loads((tmp_path / "out" / "inputs" / "000000.json").read_text())
    assert record["count"] == 7 and [(s["key"], s["shard"]) for s in record["skipped"]] == [
        ("corrupt", "shard-000000-0000"), ("noimage", "shard-000000-0001"), ("garbage", "shard-000000-0001")]
    assert "no image member" in record["skipped"][1]["error"] and "png member" in record["skipped"][2]["error"]
    shard = json.loads((tmp_path / "out" / "shard-000000-0001.json").read_text())
    assert [s["key"] for s in shard["skipped"]] == ["noimage", "garbage"]
    out, err = capsys.readouterr()
    assert "3 bad input sample(s) skipped" in out and "corrupt in " in out
    assert f"input tar {tmp_path / 'bad.tar'}: skipped sample noimage: no image member" in err


def test_bad_specs_are_named_with_the_fix(tmp_path, tars):
    with pytest.raises(FileNotFoundError, match=r"in-\{000000\.\.000009\}.tar: 7 of the 10 local tars it names do "
                                                r"not exist \(first: .*in-000003.tar\): fix the path"):
        encode(input=tars / "in-{000000..000009}.tar", out=tmp_path / "o")
    with pytest.raises(FileNotFoundError, match="the pattern matches no files"):
        encode(input=tmp_path / "*.tar", out=tmp_path / "o")
    with pytest.raises(ValueError, match=r"webdataset opens no s3: URLs .* input='pipe:aws s3 cp s3://bucket/"):
        encode(input="s3://bucket/shard-{000000..000009}.tar", out=tmp_path / "o")
    with pytest.raises(ValueError, match="limit=4 counts listed images.*name fewer tars"):
        encode(input=tars, out=tmp_path / "o", limit=4)
    with pytest.raises(OSError, match=r"cannot read input tar pipe:cat /nonexistent.tar \(the command exited with "
                                      r"status 1\); the command must write a tar to stdout"):
        encode(input="pipe:cat /nonexistent.tar", out=tmp_path / "p")
    with pytest.raises(OSError, match=r"pipe:head -c 1536 .*\(ReadError: unexpected end of data\)"):
        encode(input=f"pipe:head -c 1536 {tars / 'in-000000.tar'}", out=tmp_path / "q")  # a truncated tar
