"""run.loggers: TensorBoard events and an offline W&B run mirror metrics.jsonl, resume continues them, and a
failing tracker never stops training."""

from __future__ import annotations

import glob
import json
import struct

import pytest
from hydra import compose, initialize_config_dir

from bigdit.metrics import read_metrics
from bigdit.train import CONFIG_DIR, train

TINY = ["experiment=demo", "model.hidden_size=32", "model.depth=2", "model.num_heads=2", "run.global_batch=16",
        "optim.warmup_steps=0", "run.log_every=2", "run.ckpt_every=2"]


def run(tmp_path, *overrides):
    with initialize_config_dir(CONFIG_DIR, version_base=None):
        cfg = compose("train", overrides=[*TINY, f"run.dir={tmp_path}", *overrides])
    train(cfg)
    return read_metrics(tmp_path / "metrics.jsonl")


def tensorboard_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the event files under ``log_dir``, read with TensorBoard's own event reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def wandb_records(run_dir) -> list:
    """The protobuf records of every offline W&B run file under ``run_dir`` (LevelDB-style log: a 7-byte
    ``:W&B`` header, then 32 KiB blocks of records with a 7-byte crc/length/type header each)."""
    from wandb.proto import wandb_internal_pb2 as pb

    records = []
    for path in sorted(glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))):
        data, pos, chunk = open(path, "rb").read(), 7, b""
        assert data[:4] == b":W&B"
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7:  # block trailer too short for a header: skipped
                pos += 32768 - pos % 32768
                continue
            _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
            chunk += data[pos + 7:pos + 7 + n]
            pos += 7 + n
            if kind in (1, 4):  # FULL or LAST piece of a record
                record = pb.Record()
                record.ParseFromString(chunk)
                records.append(record)
                chunk = b""
    return records


def test_tensorboard_and_offline_wandb_mirror_metrics_and_resume_the_same_run(tmp_path):
    trackers = ["run.loggers=[jsonl,tensorboard,wandb]", "run.wandb.mode=offline", "run.wandb.tags=[test]"]
    run(tmp_path, "run.steps=4", *trackers)
    first_id = (tmp_path / "wandb_id").read_text().strip()
    records = run(tmp_path, "run.steps=6", *trackers)  # resumes at step 4
    assert [r["step"] for r in records] == [2, 4, 6]

    scalars = tensorboard_scalars(tmp_path / "tb")
    for key in ("loss", "grad_norm", "lr", "img_per_s", "nimg", "bad_samples"):
        assert [s for s, _ in scalars[key]] == [2, 4, 6], key  # one value per step across the resume
    assert [v for _, v in scalars["loss"]] == pytest.approx([r["loss"] for r in records], rel=1e-6)

    assert (tmp_path / "wandb_id").read_text().strip() == first_id
    found = wandb_records(tmp_path)
    runs = [r.run for r in found if r.WhichOneof("record_type") == "run"]
    assert {r.run_id for r in runs} == {first_id} and len(runs) == 2 and list(runs[0].tags) == ["test"]
    config = {item.key: json.loads(item.value_json) for item in runs[0].config.update}
    assert config["model"]["hidden_size"] == 32 and config["run"]["steps"] == 4
    history = [r.history for r in found if r.WhichOneof("record_type") == "history"]
    logged = {}
    for h in history:
        items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in h.item}
        if "loss" in items:
            logged[h.step.num] = items
    assert sorted(logged) == [2, 4, 6]
    assert {k for k in records[-1] if k != "step"} <= set(logged[6])
    assert logged[6]["loss"] == pytest.approx(records[-1]["loss"], rel=1e-6)


def test_a_failing_tracker_warns_once_and_training_goes_on(tmp_path):
    (tmp_path / "tb").write_text("a file where TensorBoard wants its directory")
    with pytest.warns(UserWarning, match="logger tensorboard failed and is switched off"):
        records = run(tmp_path, "run.steps=4", "run.loggers=[jsonl,tensorboard]")
    assert [r["step"] for r in records] == [2, 4]


def test_unknown_logger_is_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match=r"unknown logger\(s\) \['mlflow'\].*tensorboard"):
        run(tmp_path, "run.steps=2", "run.loggers=[jsonl,mlflow]")
    assert not (tmp_path / "checkpoints").exists()
