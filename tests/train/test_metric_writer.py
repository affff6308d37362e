"""MetricWriter: JSONL + TensorBoard, legal TensorBoard tags, flush, resume, and no tensorboardX."""

import json
import pathlib
import struct
import sys

import pytest

from recjax.train.metric_writer import MetricWriter, read_jsonl, tensorboard_tag


def _scalars(tb_dir: pathlib.Path) -> list[tuple[str, int, float]]:
    """(tag, step, value) of every scalar in every event file of ``tb_dir`` (TFRecord framing)."""
    from tensorboardX.proto import event_pb2

    out = []
    for path in sorted(tb_dir.iterdir()):
        data, pos = path.read_bytes(), 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            record = data[pos + 12 : pos + 12 + length]  # skip the length's CRC; the data's CRC follows
            pos += 12 + length + 4
            event = event_pb2.Event.FromString(record)
            out += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
    return out


def test_tensorboard_tag_is_legal():
    assert tensorboard_tag("valid/hr@10") == "valid/hr_at_10"
    assert tensorboard_tag("train/moe aux:loss") == "train/moe_aux_loss"
    assert tensorboard_tag("a-b.c_d/e0") == "a-b.c_d/e0"


def test_jsonl_keeps_names_tensorboard_gets_legal_tags(tmp_path):
    w = MetricWriter(tmp_path)
    w.write(7, {"hr@10": 0.25, "mrr": 0.5}, prefix="valid/")
    w.flush()  # visible before close: TensorBoard can show a running job
    assert {(t, s) for t, s, _ in _scalars(tmp_path / "tensorboard")} == {
        ("valid/hr_at_10", 7),
        ("valid/mrr", 7),
    }
    w.close()
    (rec,) = read_jsonl(tmp_path / "metrics.jsonl")
    assert rec["valid/hr@10"] == 0.25 and rec["step"] == 7


def test_resume_keeps_earlier_events(tmp_path):
    w = MetricWriter(tmp_path)
    for step in (1, 2, 3):
        w.write(step, {"loss": float(step)}, prefix="train/")
    w.close()
    w = MetricWriter(tmp_path, purge_step=3)  # resumed from the checkpoint at step 3
    for step in (3, 4):
        w.write(step, {"loss": 10.0 + step}, prefix="train/")
    w.close()
    steps = sorted(s for _, s, _ in _scalars(tmp_path / "tensorboard"))
    assert steps[:2] == [1, 2] and set(steps) == {1, 2, 3, 4}
    assert [r["train/loss"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1.0, 2.0, 13.0, 14.0]


def test_without_tensorboardx_writes_jsonl_and_warns_once(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m.startswith("tensorboardX")] + ["tensorboardX"]:
        monkeypatch.setitem(sys.modules, name, None)  # `import tensorboardX` now raises ImportError
    with pytest.warns(UserWarning, match="tensorboardX is not installed") as record:
        w = MetricWriter(tmp_path)
    assert len(record) == 1 and not w.tensorboard
    w.write(1, {"hr@10": 0.5}, prefix="test/")
    w.flush()
    w.close()
    assert not (tmp_path / "tensorboard").exists()
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["test/hr@10"] == 0.5
