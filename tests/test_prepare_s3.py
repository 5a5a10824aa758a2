"""Prepare into a real S3-compatible store (SeaweedFS on loopback) and read back; a wrong key is refused."""

import pytest
import s3fs

from jobs.prepare import main
from pipeline.images import ImageError, check_image_file, read_image_bytes
from pipeline.tasks import SUMMARY_FILE, list_shards, read_tasks


def test_prepare_shapes_into_s3_and_read_back(s3, ray_local, capsys):
    out = f"s3://{s3.bucket}/prepare-test/shapes"
    assert main(["--format", "shapes", "--num-images", "12", "--seed", "5", "--out", out,
                 "--rows-per-file", "6", "--s3-endpoint", s3.endpoint]) == 0
    assert "12 images, 48 expressions" in capsys.readouterr().out
    files = list_shards(out, s3.options)
    assert [f.rsplit("/", 1)[1] for f in files] == ["test-00000.parquet", "train-00000.parquet",
                                                    "train-00001.parquet", "val-00000.parquet"]
    rows = read_tasks(out, s3.options).take_all()
    assert len(rows) == 12 and sum(len(r["expressions"]) for r in rows) == 48
    uri = rows[0]["image_uri"]
    assert uri.startswith(f"s3://{s3.bucket}/prepare-test/shapes/raw/images/shapes_")
    assert read_image_bytes(uri, s3.options)[:4] == b"\x89PNG"
    fs = s3fs.S3FileSystem(endpoint_url=s3.endpoint, key=s3.key, secret=s3.secret, skip_instance_cache=True)
    assert fs.exists(f"{s3.bucket}/prepare-test/shapes/{SUMMARY_FILE}")


def test_s3_images_obey_the_byte_cap_and_name_missing_keys(s3):
    """Objects are regular by construction; the cap is checked from the object's size before any byte is read."""
    fs = s3fs.S3FileSystem(endpoint_url=s3.endpoint, key=s3.key, secret=s3.secret, skip_instance_cache=True)
    fs.pipe(f"{s3.bucket}/cap/big.png", b"x" * 2000)
    uri = f"s3://{s3.bucket}/cap/big.png"
    assert check_image_file(uri, s3.options, max_bytes=2000) == 2000
    assert read_image_bytes(uri, s3.options, max_bytes=2000) == b"x" * 2000
    for check in (read_image_bytes, check_image_file):
        with pytest.raises(ImageError, match="2000 bytes exceeds the limit of 1000") as info:
            check(uri, s3.options, max_bytes=1000)
        assert info.value.reason == "image file too large"
        with pytest.raises(ImageError, match="missing image") as info:
            check(f"s3://{s3.bucket}/cap/gone.png", s3.options)


def test_wrong_key_is_refused_with_a_clear_message(s3, monkeypatch, capsys):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        code = main(["--format", "shapes", "--num-images", "2", "--out", f"s3://{s3.bucket}/refused",
                     "--s3-endpoint", s3.endpoint])
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
    assert code == 2
    err = capsys.readouterr().err
    assert "access to s3://" in err and "refused" in err and "not-the-secret" not in err
