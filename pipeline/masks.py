"""Binary masks as COCO compressed RLE: the one mask representation stored anywhere in the pipeline.

An RLE here is a plain dict ``{"size": [h, w], "counts": str}`` (counts as a UTF-8 string, as COCO's
JSON files hold it), so it round-trips through JSON and Parquet structs unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pyarrow as pa
from pycocotools import mask as mask_utils

RLE = dict  # {"size": [h, w], "counts": str}


def _to_coco(rle: RLE) -> dict:
    counts = rle["counts"]
    return {"size": [int(rle["size"][0]), int(rle["size"][1])],
            "counts": counts.encode("utf-8") if isinstance(counts, str) else counts}


def _from_coco(rle: dict) -> RLE:
    counts = rle["counts"]
    return {"size": [int(rle["size"][0]), int(rle["size"][1])],
            "counts": counts.decode("utf-8") if isinstance(counts, bytes) else counts}


def encode(mask: np.ndarray) -> RLE:
    """(H, W) bool/uint8 array -> compressed RLE."""
    if mask.ndim != 2:
        raise ValueError(f"expected a 2-D mask, got shape {mask.shape}")
    return _from_coco(mask_utils.encode(np.asfortranarray(mask.astype(np.uint8))))


def decode(rle: RLE) -> np.ndarray:
    """Compressed RLE -> (H, W) bool array; ValueError naming the problem for an invalid RLE (`rle_problem`),
    which pycocotools would read past its end."""
    problem = rle_problem(rle)
    if problem is not None:
        raise ValueError(f"invalid RLE mask: {problem}")
    return mask_utils.decode(_to_coco(rle)).astype(bool)


def empty(height: int, width: int) -> RLE:
    return encode(np.zeros((height, width), dtype=np.uint8))


def area(rle: RLE) -> int:
    return int(mask_utils.area(_to_coco(rle)))


def to_bbox(rle: RLE) -> list[float]:
    """Tight box [x, y, w, h] of the mask (all zeros when empty), as pycocotools' toBbox."""
    return [float(v) for v in mask_utils.toBbox(_to_coco(rle))]


def union(rles: Sequence[RLE], height: int, width: int) -> RLE:
    """Union of masks (clipped to 1); the empty mask for no input."""
    if not rles:
        return empty(height, width)
    return _from_coco(mask_utils.merge([_to_coco(r) for r in rles], intersect=False))


def from_polygons(polygons: Iterable[Sequence[float]], height: int, width: int) -> RLE:
    """COCO polygon list (flat x0, y0, x1, y1, ...) -> one merged RLE, rasterised by pycocotools."""
    polys = [list(map(float, p)) for p in polygons if len(p) >= 6]
    if not polys:
        return empty(height, width)
    return _from_coco(mask_utils.merge(mask_utils.frPyObjects(polys, height, width)))


def from_segmentation(segmentation, height: int, width: int) -> RLE:
    """Any COCO `segmentation` (polygons, uncompressed RLE with list counts, compressed RLE) -> RLE."""
    if isinstance(segmentation, list):
        return from_polygons(segmentation, height, width)
    if isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        return _from_coco(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation, dict) and "counts" in segmentation:
        rle = _from_coco(_to_coco(segmentation))
        problem = rle_problem(rle)
        if problem is not None:  # a source file's RLE is validated before pycocotools merges it
            raise ValueError(f"invalid compressed RLE: {problem}")
        return rle
    raise ValueError(f"unrecognised COCO segmentation of type {type(segmentation).__name__}")


def intersection_union(pred: Sequence[RLE], gt: Sequence[RLE]) -> tuple[np.ndarray, np.ndarray]:
    """Per-pair pixel intersection and union of two equal-length lists of RLEs, computed on the RLEs.

    Uses merge(intersect=True) and area; no mask is decoded to a dense array.
    """
    if len(pred) != len(gt):
        raise ValueError(f"{len(pred)} predictions vs {len(gt)} ground-truth masks")
    inter = np.empty(len(pred), dtype=np.int64)
    uni = np.empty(len(pred), dtype=np.int64)
    for i, (p, g) in enumerate(zip(pred, gt)):
        pc, gc = _to_coco(p), _to_coco(g)
        if pc["size"] != gc["size"]:
            raise ValueError(f"mask size {pc['size']} differs from ground truth {gc['size']}")
        a_p, a_g = int(mask_utils.area(pc)), int(mask_utils.area(gc))
        inter[i] = 0 if a_p == 0 or a_g == 0 else int(mask_utils.area(mask_utils.merge([pc, gc], intersect=True)))
        uni[i] = a_p + a_g - inter[i]
    return inter, uni



#: pycocotools stores counts as uint32; a run needs at most 7 characters of 5 bits (35 bits with the sign).
_MAX_RUN = 2**32 - 1
_MAX_CHARS_PER_RUN = 7
#: Characters validated at once (~50 bytes of numpy arrays each): bounds the memory of a block of masks.
_CHUNK_CHARS = 2**21


def _character_buffer(counts) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(characters as uint8, start of each string in them, length of each string or -1 where null). An Arrow
    binary/string array is read from its buffers as is: no Python object per mask."""
    if isinstance(counts, (pa.Array, pa.ChunkedArray)):
        array = counts.combine_chunks() if isinstance(counts, pa.ChunkedArray) else counts
        array = array.cast(pa.large_binary())
        _, offsets, data = array.buffers()
        bounds = np.frombuffer(offsets, np.int64)[array.offset:array.offset + len(array) + 1]
        raw = np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8)
        valid = array.is_valid().to_numpy(zero_copy_only=False)
        return raw, bounds[:-1], np.where(valid, np.diff(bounds), -1)
    data = [c.encode("utf-8", "surrogatepass") if isinstance(c, str) else c for c in counts]
    lengths = np.fromiter((-1 if c is None else len(c) for c in data), np.int64, len(data))
    sizes = np.maximum(lengths, 0)
    return np.frombuffer(b"".join(c for c in data if c), np.uint8), np.cumsum(sizes) - sizes, lengths


def rle_problems(counts, height: np.ndarray, width: np.ndarray) -> list[str | None]:
    """Why each compressed RLE is unusable, or None where it is valid; a null `counts` is None (no mask).
    `counts`: a sequence of bytes/str/None, or an Arrow binary/string array (read without copies).

    Validated in numpy before pycocotools ever sees the string, because pycocotools' parser trusts it: a
    string ending mid-number is read past its end, and counts that do not add up to h*w make decode write
    past the mask (a hang or a crash, not an error). The string is COCO's LEB128-like form: per run, 5-bit
    groups (character - 48), bit 0x20 = "more groups follow", bit 0x10 of the last group = negative; runs
    from the fourth on are deltas to the run two before. Valid: characters in '0'..'o', no run cut off at the
    end, at most 7 groups per run, every decoded run in [0, 2**32), and the runs adding up to h*w >= 0.
    """
    height, width = np.asarray(height, np.int64), np.asarray(width, np.int64)
    raw, starts, lengths = _character_buffer(counts)
    negative = (lengths >= 0) & ((height < 0) | (width < 0))
    area = height * width
    out: list[str | None] = [None] * len(lengths)
    for i in np.flatnonzero(negative):
        out[i] = f"negative size {[int(height[i]), int(width[i])]}"
    for i in np.flatnonzero((lengths == 0) & ~negative & (area != 0)):
        out[i] = f"counts add up to 0 pixels, not h*w = {int(area[i])}"
    rows = np.flatnonzero((lengths > 0) & ~negative)
    # Bounded memory: at most about _CHUNK_CHARS characters are validated at a time.
    chunk_of = np.cumsum(lengths[rows]) // _CHUNK_CHARS
    edges = np.searchsorted(chunk_of, np.unique(chunk_of)).tolist() + [len(rows)]
    for a, b in zip(edges, edges[1:]):
        part = rows[a:b]
        size = lengths[part]
        ends = np.cumsum(size)
        first = int(starts[part[0]])
        if int(starts[part[-1]]) + int(size[-1]) - first == int(ends[-1]):  # contiguous (the usual case)
            chars = raw[first:first + int(ends[-1])]
        else:  # gather the part's characters past null or refused rows
            chars = raw[np.arange(int(ends[-1])) + np.repeat(starts[part] - (ends - size), size)]
        for j, problem in _run_problems(chars, ends, area[part]).items():
            out[int(part[j])] = problem
    return out


def _run_problems(raw: np.ndarray, ends: np.ndarray, area: np.ndarray) -> dict[int, str]:
    """The problems (string index -> reason) of non-empty counts strings laid end to end in `raw` (string i
    ends at ends[i]), vectorised over all their characters (byte-wide where possible: most runs are one
    character)."""
    n = len(ends)
    starts = np.r_[0, ends[:-1]]

    def per_string(flags: np.ndarray, first: np.ndarray, stop: np.ndarray) -> np.ndarray:
        """How many flags are set in each [first, stop) slice (a prefix-sum difference, no Python loop)."""
        prefix = np.zeros(len(flags) + 1, np.int64)
        np.cumsum(flags, out=prefix[1:])
        return prefix[stop] - prefix[first]

    def strings_with(positions: np.ndarray) -> np.ndarray:
        """(n,) bool: the strings holding any of these (few) character positions."""
        return np.bincount(np.searchsorted(ends, positions, side="right"), minlength=n)[:n] > 0

    group = raw - np.uint8(48)  # 6-bit groups; characters outside the alphabet wrap above 63
    bad_char = strings_with(np.flatnonzero(group > 63))
    more = group >= 32  # "more groups follow"
    cut = more[ends - 1]  # the last character says "more groups follow"
    last = ~more
    last[ends - 1] = True  # runs never span two strings (a run cut off there is already marked)
    runs_per = per_string(last, starts, ends)
    first_run = np.cumsum(runs_per) - runs_per
    run_end = np.flatnonzero(last)
    run_owner = np.repeat(np.arange(n), runs_per)
    run_len = np.diff(np.r_[-1, run_end])  # runs tile the characters, string after string
    tail = group[run_end]  # each run's last group: its 5 high bits, and the sign
    value = (tail & np.uint8(0x1F)).astype(np.int64) - (tail & np.uint8(0x10)).astype(np.int64) * 2
    multi = np.flatnonzero(run_len > 1)  # rare: runs of several groups, assembled here
    if len(multi):
        length = np.minimum(run_len[multi], 8)
        assembled = (tail[multi] & np.uint8(0x1F)).astype(np.int64) << (5 * (length - 1))
        for back in range(1, 8):  # the earlier groups, least significant first
            has = length > back
            pos = run_end[multi] - back
            earlier = (group[np.where(has, pos, 0)] & np.uint8(0x1F)).astype(np.int64)
            assembled += np.where(has, earlier << (5 * (length - 1 - back)), 0)
        negative = (tail[multi] & np.uint8(0x10)) != 0
        value[multi] = assembled - np.where(negative, np.int64(1) << (5 * length), 0)
    # Deltas: run k >= 3 of a string adds run k-2, so each chain of one parity of k is a running sum within its
    # string. Runs of one string are consecutive, so a chain is every other run globally: two stride-2 running
    # sums, less the sum before the string's first run in that stride.
    k = np.arange(len(run_end)) - first_run[run_owner]
    chained = np.where(k > 0, value, 0)
    running = np.empty_like(chained)
    running[0::2], running[1::2] = np.cumsum(chained[0::2]), np.cumsum(chained[1::2])
    padded = np.r_[0, 0, running]
    start = first_run[run_owner]
    before = np.where((start - 1) % 2 == np.arange(len(run_end)) % 2, start - 1, start - 2)
    decoded = np.where(k > 0, running - padded[before + 2], value)
    bad_run = per_string((run_len > _MAX_CHARS_PER_RUN) | (decoded < 0) | (decoded > _MAX_RUN),
                         first_run, first_run + runs_per) > 0
    total = np.add.reduceat(np.clip(decoded, 0, _MAX_RUN), first_run)
    wrong_sum = total != area
    out: dict[int, str] = {}
    for j in np.flatnonzero(bad_char | cut | bad_run | wrong_sum).tolist():
        out[j] = ("counts hold characters outside COCO's RLE alphabet" if bad_char[j]
                  else "counts end in the middle of a run" if cut[j]
                  else "counts hold a run outside [0, 2**32)" if bad_run[j]
                  else f"counts add up to {int(total[j])} pixels, not h*w = {int(area[j])}")
    return out


def rle_problem(rle: RLE | None) -> str | None:
    """`rle_problems` for one RLE dict (None: no mask, no problem); a size that is not [h, w] is a problem."""
    if rle is None or rle.get("counts") is None:
        return None
    size = rle.get("size")
    if size is None or len(size) != 2:
        return f"size {size!r} is not [height, width]"
    return rle_problems([rle["counts"]], np.array([size[0]]), np.array([size[1]]))[0]
