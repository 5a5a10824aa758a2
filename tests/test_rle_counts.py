"""The vectorised counts parser (pipeline.rle_counts): areas as pycocotools counts them, the same verdicts
whatever the chunking, and runs of every length the format allows."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from pycocotools import mask as mask_utils

from pipeline import masks, rle_counts


def _random_masks(rng: np.random.Generator, count: int) -> list[dict]:
    """Masks from tiny to 1500 x 1300 (runs of up to 5 groups), sparse to full, with solid blocks."""
    out = []
    for _ in range(count):
        h, w = (int(v) for v in rng.integers(1, 60, 2))
        m = rng.random((h, w)) < rng.random()
        if rng.random() < 0.3:
            m[:] = rng.random() < 0.5  # all empty or all full
        out.append(masks.encode(m))
    big = np.zeros((1500, 1300), bool)
    big[200:1400, 100:1200] = True
    return out + [masks.encode(big), masks.encode(~big)]


def test_area_is_pycocotools_area():
    rls = _random_masks(np.random.default_rng(3), 400)
    check = rle_counts.check_counts([r["counts"] for r in rls], [r["size"][0] for r in rls],
                                    [r["size"][1] for r in rls])
    assert check.problems == [None] * len(rls)
    assert check.area.tolist() == [int(mask_utils.area(masks._to_coco(r))) for r in rls]


@pytest.mark.parametrize("chunk", [1, 5, 64, 4096])
def test_chunking_changes_nothing(monkeypatch, chunk):
    """Strings split over chunks of any size (one string longer than a chunk gets its own) give the same
    verdicts and areas, valid and invalid strings mixed, nulls and empty strings between them."""
    rng = np.random.default_rng(11)
    rls = _random_masks(rng, 120)
    counts = [r["counts"] for r in rls]
    h, w = [r["size"][0] for r in rls], [r["size"][1] for r in rls]
    counts += [None, "", "0", "PPP", "PPP\x7f~", "0" * 10, "oooooooo0", "ooooooo", rls[0]["counts"]]
    h += [0, 0, 5, 5, 5, 0, 3, 3, -2]
    w += [0, 0, 7, 7, 7, 0, 3, 3, 4]
    expected = rle_counts.check_counts(pa.array(counts, pa.string()), h, w)
    monkeypatch.setattr(rle_counts, "CHUNK_CHARS", chunk)
    got = rle_counts.check_counts(counts, h, w)
    assert got.problems == expected.problems and got.area.tolist() == expected.area.tolist()
    assert got.problems[-9:-1] == [None, None, "counts add up to 0 pixels, not h*w = 35",
                                   "counts end in the middle of a run",
                                   "counts hold characters outside COCO's RLE alphabet", None,
                                   "counts hold a run outside [0, 2**32)", "counts end in the middle of a run"]
    assert "negative size" in got.problems[-1]
    assert (got.area[[i for i, p in enumerate(got.problems) if p is not None]] == 0).all()


def test_runs_of_every_length():
    """Runs of 1 to 7 groups (values up to 2**32 - 1) decode to their value, seen in the area and the h*w sum,
    as pycocotools reads them; 8 groups are refused."""
    for value in (0, 5, 15, 16, 31, 2**10, 2**15 + 3, 2**20, 2**25 - 1, 2**30, 2**32 - 4):
        rle = mask_utils.frPyObjects({"size": [1, value + 3], "counts": [3, value]}, 1, value + 3)
        check = rle_counts.check_counts([rle["counts"]], [1], [value + 3])
        assert check.problems == [None] and check.area.tolist() == [int(mask_utils.area(rle))] == [value]
    longest = mask_utils.frPyObjects({"size": [1, 2**32 - 1], "counts": [2**32 - 1]}, 1, 2**32 - 1)["counts"]
    assert len(longest) == 7 and rle_counts.check_counts([longest], [1], [2**32 - 1]).problems == [None]
    too_long = "ooooooo0"  # 8 groups
    assert "outside [0, 2**32)" in rle_counts.check_counts([too_long], [1], [1]).problems[0]
