"""One module names every location: local paths and object-storage URIs read alike."""

import pytest

from pipeline.data import locations


def test_local_and_s3_files_read_alike_and_failures_name_the_location(
    tmp_path, s3_bucket, monkeypatch
):
    (tmp_path / "a.bin").write_bytes(b"\x00\x01")
    locations.write_bytes(f"{s3_bucket}/a.bin", b"\x00\x01")
    monkeypatch.setenv("HOME", str(tmp_path))
    for location in (tmp_path / "a.bin", "~/a.bin", f"{s3_bucket}/a.bin"):
        assert locations.read_bytes(location) == b"\x00\x01"
    for missing in (tmp_path / "none.bin", f"{s3_bucket}/none.bin"):
        with pytest.raises(FileNotFoundError, match="none.bin"):
            locations.read_bytes(missing)
    with pytest.raises(locations.LocationError, match=f"{tmp_path}: cannot read it"):
        locations.read_bytes(tmp_path)  # a directory
