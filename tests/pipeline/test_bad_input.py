"""Bad images in shards: each unusable row is rejected with its id and reason, each odd but
usable one is decoded, and every pass accounts for every row."""

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from PIL import Image

from pipeline.data.ingest import (
    ImageSpec,
    ViewPlan,
    decode_batch,
    decode_image,
    training_dataset,
)
from pipeline.data.ledger import IngestLedger, summary_line, write_report
from pipeline.data.shards import MANIFEST_NAME, ShardManifest
from ssl_models.transforms.views import ViewRecipe


def _encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def _rows() -> dict[str, bytes]:
    """Id -> bytes: usable images in every awkward mode first, then unusable ones."""
    rgb = Image.new("RGB", (16, 16), (200, 30, 30))
    jpeg = _encode(rgb, "JPEG")
    return {
        "rgb": _encode(rgb),
        "grey": _encode(Image.new("L", (16, 16), 90)),
        "rgba": _encode(Image.new("RGBA", (16, 16), (0, 200, 0, 128))),
        "cmyk": _encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG"),
        "palette": _encode(rgb.convert("P", palette=Image.Palette.ADAPTIVE)),
        "sixteen_bit": _encode(Image.fromarray(np.full((16, 16), 40000, np.uint16))),
        "tiny": _encode(Image.new("RGB", (2, 3), (10, 20, 30))),
        "huge_aspect": _encode(Image.new("RGB", (300, 7), (5, 5, 5))),
        "truncated": jpeg[: len(jpeg) // 2],
        "zero_bytes": b"",
        "not_an_image": b"GIF89a but not really",
    }


USABLE = ["rgb", "grey", "rgba", "cmyk", "palette", "sixteen_bit", "tiny", "huge_aspect"]
UNUSABLE = ["truncated", "zero_bytes", "not_an_image"]


def test_odd_modes_decode_and_broken_bytes_are_rejected_with_reasons(caplog):
    rows = _rows()
    names, images = list(rows), np.asarray(list(rows.values()), dtype=object)
    with caplog.at_level("WARNING", logger="pipeline.data.ingest"):
        decoded = decode_batch(names, images, ImageSpec(12, 3))
    logged = [r.getMessage().split()[2].rstrip(":") for r in caplog.records]
    assert logged == UNUSABLE  # each rejected row is logged once, by its id
    assert [names[p] for p in decoded.kept] == USABLE
    assert decoded.pixels.shape == (len(USABLE), 3, 12, 12)
    reasons = {names[p]: reason for p, reason in decoded.rejects.items()}
    assert set(reasons) == set(UNUSABLE)
    assert "truncated" in reasons["truncated"] or "OSError" in reasons["truncated"]
    assert reasons["zero_bytes"].startswith("UnidentifiedImageError")
    # 16-bit grey keeps its top 8 bits (40000 >> 8 = 156) instead of clipping to white.
    sixteen = decode_image(rows["sixteen_bit"], ImageSpec(12, 1))
    assert sixteen.min() == sixteen.max() == 156


@pytest.mark.parametrize("pixels", [120 * 100, 400 * 100])  # 1.2x and 4x the limit
def test_decompression_bombs_are_refused(monkeypatch, pixels):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    bomb = _encode(Image.new("L", (pixels // 100, 100)))
    decoded = decode_batch(["bomb"], np.asarray([bomb], dtype=object), ImageSpec(12, 1))
    assert decoded.kept == [] and "DecompressionBomb" in decoded.rejects[0]


def _write_shards(rows: dict[str, bytes], out) -> None:
    out.mkdir()
    table = pa.table({"id": list(rows), "image": pa.array(list(rows.values()), pa.binary())})
    pq.write_table(table, out / "part-00000.parquet")
    manifest = ShardManifest(
        rows=len(rows),
        shards=["part-00000.parquet"],
        num_classes=None,
        channels=3,
        image_size=None,
        source="test",
    )
    (out / MANIFEST_NAME).write_text(manifest.to_json())


def test_every_pass_accounts_for_every_row(ray_session, tmp_path):
    rows = _rows()
    _write_shards(rows, tmp_path / "shards")
    ledger = IngestLedger.remote(len(rows))
    ds = training_dataset(
        tmp_path / "shards",
        ImageSpec(12, 3),
        ViewPlan((ViewRecipe.simclr(12),) * 2),
        epochs=2,
        first_epoch=4,
        batch_size=4,
        ledger=ledger,
    )
    delivered = [i for b in ds.iter_batches(batch_size=5, batch_format="numpy") for i in b["id"]]
    assert sorted(delivered) == sorted(USABLE * 2)

    report = ray.get(ledger.report.remote())
    assert list(report) == [5, 6]  # a run resumed after 4 epochs numbers its passes on
    for counts in report.values():
        assert counts["rows"] == len(rows) == counts["delivered"] + counts["rejected"]
        assert counts["delivered"] == len(USABLE) and counts["not_decoded"] == 0
        assert sorted(r["id"] for r in counts["rejects"]) == sorted(UNUSABLE)
    line = summary_line(5, report[5])
    assert line.startswith("data, epoch 5: 11 rows = 8 delivered + 3 rejected; rejected: ")

    write_report(str(tmp_path / "run"), report)
    written = json.loads((tmp_path / "run" / "ingest_report.json").read_text())
    assert written["6"]["rejected"] == 3
