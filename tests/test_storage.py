"""Object storage through fsspec against the real loopback SeaweedFS server."""

import pytest

from pipeline import masks, storage


def test_s3_round_trip_and_wrong_key_refused(s3, monkeypatch):
    uri = f"s3://{s3.bucket}/storage-test/hello.txt"
    fs, path = storage.filesystem(uri, s3.options)
    with fs.open(path, "wb") as f:
        f.write(b"hello")
    assert fs.cat(path) == b"hello"
    storage.check_access(uri, s3.options)

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    with pytest.raises(storage.StorageError, match="refused"):
        storage.check_access(f"s3://{s3.bucket}/storage-test/", s3.options, write=True)
    s3fs.S3FileSystem.clear_instance_cache()


def test_join_keeps_scheme(tmp_path):
    assert storage.join("s3://b/x", "y", "z.parquet") == "s3://b/x/y/z.parquet"
    assert storage.join(str(tmp_path), "a") == str(tmp_path / "a")


def test_rle_round_trip_and_iou():
    import numpy as np

    a = np.zeros((7, 9), bool)
    a[1:4, 2:6] = True
    b = np.zeros((7, 9), bool)
    b[2:5, 3:7] = True
    ra, rb = masks.encode(a), masks.encode(b)
    assert isinstance(ra["counts"], str) and ra["size"] == [7, 9]
    assert (masks.decode(ra) == a).all()
    inter, union = masks.intersection_union([ra, ra, masks.empty(7, 9)], [rb, ra, masks.empty(7, 9)])
    assert inter.tolist() == [int((a & b).sum()), int(a.sum()), 0]
    assert union.tolist() == [int((a | b).sum()), int(a.sum()), 0]
    assert masks.to_bbox(ra) == [2.0, 1.0, 4.0, 3.0]
    assert (masks.decode(masks.union([ra, rb], 7, 9)) == (a | b)).all()


def test_output_listing_sees_what_other_processes_wrote(s3):
    """The driver lists done/ before the run (plan) and after it (summary), while Ray workers write the
    markers through their own filesystem objects: s3fs caches listings per instance, and fsspec shares the
    instance within a process, so the second listing must not be the first one replayed."""
    import json
    import uuid

    import s3fs

    from pipeline.annotate.layout import OutputLayout, completed

    layout = OutputLayout(f"s3://{s3.bucket}/listing-{uuid.uuid4().hex[:8]}", s3.options)
    fs, root = layout.fs()
    fs.pipe(f"{root}/done/a.json", json.dumps({"rows": 1}).encode())
    fs.pipe(f"{root}/predictions/a.parquet", b"x")
    assert set(completed(layout)) == {"a"}  # listed (and cached) once
    worker = s3fs.S3FileSystem(endpoint_url=s3.endpoint, skip_instance_cache=True)  # another process's view
    worker.pipe(f"{root}/predictions/b.parquet", b"x")
    worker.pipe(f"{root}/done/b.json", json.dumps({"rows": 2}).encode())
    assert set(completed(layout)) == {"a", "b"}
