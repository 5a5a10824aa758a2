"""COCO compressed-RLE counts strings parsed in numpy, many at once: validity and area in one pass.

pycocotools' parser trusts its input: a string ending mid-number is read past its end, and counts that do
not add up to h*w make decode write past the mask (a hang or a crash, not an error). So every counts string
is checked here before pycocotools sees it, and the same pass yields each mask's area (the sum of its odd
runs, what pycocotools' `area` returns), so scoring never parses a string twice for it.

The format (pycocotools `rleFrString`): per run, 5-bit groups (character - 48), bit 0x20 = "more groups
follow", bit 0x10 of the last group = negative; runs from the fourth on are deltas to the run two before.
Valid: characters in '0'..'o', no run cut off at the end, at most 7 groups per run, every decoded run in
[0, 2**32), and the runs adding up to h*w >= 0. The strings are read straight from Arrow's buffers (no Python
object per mask) and parsed in chunks of about CHUNK_CHARS characters, which bounds the memory and keeps the
numpy temporaries in cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

#: pycocotools stores counts as uint32; a run needs at most 7 characters of 5 bits (35 bits with the sign).
MAX_RUN = 2**32 - 1
MAX_CHARS_PER_RUN = 7
#: Characters parsed at once: ~40 bytes of numpy temporaries each, small enough to stay in cache.
CHUNK_CHARS = 2**16
_ZERO, _LAST_CHAR = ord("0"), ord("0") + 63  # the alphabet: '0' .. 'o'
#: Value of a run's last 6-bit group alone: its 5 bits, negative when bit 0x10 is set (sign-extended).
_LAST_GROUP_VALUE = np.array([(g & 0x1F) - 2 * (g & 0x10) for g in range(256)], np.int64)


@dataclass(frozen=True)
class CountsCheck:
    """Per counts string: why it is unusable (None where valid or null) and its area."""

    problems: list[str | None]
    area: np.ndarray  # (N,) int64: pixels set (sum of the odd runs); 0 where null or invalid


def character_buffer(counts) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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


def check_counts(counts, height: np.ndarray, width: np.ndarray) -> CountsCheck:
    """Validate N counts strings against their sizes and measure their areas; a null string is no mask (no
    problem, area 0). `counts`: a sequence of bytes/str/None, or an Arrow binary/string array."""
    height, width = np.asarray(height, np.int64), np.asarray(width, np.int64)
    raw, starts, lengths = character_buffer(counts)
    n = len(lengths)
    negative = (lengths >= 0) & ((height < 0) | (width < 0))
    pixels = height * width
    problems: list[str | None] = [None] * n
    area = np.zeros(n, np.int64)
    for i in np.flatnonzero(negative):
        problems[i] = f"negative size {[int(height[i]), int(width[i])]}"
    for i in np.flatnonzero((lengths == 0) & ~negative & (pixels != 0)):
        problems[i] = f"counts add up to 0 pixels, not h*w = {int(pixels[i])}"
    rows = np.flatnonzero((lengths > 0) & ~negative)
    chunk_of = np.cumsum(lengths[rows]) // CHUNK_CHARS
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
        found, area[part] = _parse(chars, ends, pixels[part])
        for j, problem in found.items():
            problems[int(part[j])] = problem
            area[int(part[j])] = 0
    return CountsCheck(problems, area)


def _parse(chars: np.ndarray, ends: np.ndarray, pixels: np.ndarray) -> tuple[dict[int, str], np.ndarray]:
    """Problems (string index -> reason) and areas of non-empty counts strings laid end to end in `chars`
    (string i ends at ends[i]), vectorised over all their characters. The common case (valid strings, most
    runs one character) takes few passes: each rare check runs only where a cheap min/max says it is needed."""
    n = len(ends)
    bad_char = np.zeros(n, bool)
    if chars.min() < _ZERO or chars.max() > _LAST_CHAR:
        outside = np.flatnonzero((chars < _ZERO) | (chars > _LAST_CHAR))
        bad_char[np.unique(np.searchsorted(ends, outside, side="right"))] = True
    group = chars - np.uint8(_ZERO)  # 6-bit groups (wrapped above 63 where bad_char)
    more = group >= 32  # "more groups follow"
    cut = more[ends - 1]  # the string's last character says "more groups follow"
    last = ~more
    last[ends - 1] = True  # runs never span two strings (one cut off there is marked above)
    run_end = np.flatnonzero(last)
    string_last_run = np.searchsorted(run_end, ends - 1)  # every string's last character ends a run
    first_run = np.r_[0, string_last_run[:-1] + 1]
    tail = group[run_end]  # each run's last group: its 5 high bits, and the sign
    value = _LAST_GROUP_VALUE[tail]
    run_len = np.diff(run_end, prepend=-1)  # runs tile the characters, string after string
    too_long = np.zeros(n, bool)
    if run_len.max() > 1:  # runs of several groups (about one in ten), assembled here
        multi = np.flatnonzero(run_len > 1)
        value[multi] = _assemble(group, run_end[multi], run_len[multi], tail[multi])
        if run_len.max() > MAX_CHARS_PER_RUN:
            owner = np.searchsorted(string_last_run, multi[run_len[multi] > MAX_CHARS_PER_RUN])
            too_long[np.unique(owner)] = True
    # Deltas: run k >= 3 of a string adds run k-2, so each parity of k is a running sum within its string. Runs
    # of one string are consecutive, so one parity of k is one parity of the global run index: a running sum
    # over each stride-2 slice, less its value before the string's first run of that parity. A string's first
    # run (k = 0) is no delta: it is left out of the sums and checked on its own.
    first_value = value[first_run]
    value[first_run] = 0
    area = np.zeros(n, np.int64)
    total = first_value.copy()
    bad_run = too_long | (first_value < 0) | (first_value > MAX_RUN)
    for parity in (0, 1):
        sums = np.cumsum(value[parity::2])
        start = (first_run + 1 - parity) // 2  # where each string's runs of this parity begin in the slice
        count = (string_last_run + 2 - parity) // 2 - start  # how many it has
        decoded = sums - np.repeat(np.r_[0, sums][start], count)  # (k = 0 reads 0 here)
        if len(decoded) and (decoded.min() < 0 or decoded.max() > MAX_RUN):
            out_of_range = np.flatnonzero((decoded < 0) | (decoded > MAX_RUN))
            bad_run[np.searchsorted(start + count, out_of_range, side="right")] = True
        prefix = np.r_[0, np.cumsum(decoded)]
        per_string = prefix[start + count] - prefix[start]  # the string's decoded runs of this parity, summed
        total += per_string
        odd = (first_run % 2) != parity  # this parity holds the string's runs 1, 3, 5...: the ones (its area)
        area[odd] = per_string[odd]
    wrong_sum = total != pixels
    found: dict[int, str] = {}
    for j in np.flatnonzero(bad_char | cut | bad_run | wrong_sum).tolist():
        found[j] = ("counts hold characters outside COCO's RLE alphabet" if bad_char[j]
                    else "counts end in the middle of a run" if cut[j]
                    else "counts hold a run outside [0, 2**32)" if bad_run[j]
                    else f"counts add up to {int(total[j])} pixels, not h*w = {int(pixels[j])}")
    return found, area


def _assemble(group: np.ndarray, run_end: np.ndarray, run_len: np.ndarray, tail: np.ndarray) -> np.ndarray:
    """Values of runs of several groups (least significant first; the last one carries the sign), adding the
    earlier groups only to the runs that have them (most have two); runs longer than 8 groups are assembled
    from their last 8 only, enough to be refused as too long."""
    length = np.minimum(run_len, 8)
    shift = 5 * (length - 1)
    assembled = (tail & np.uint8(0x1F)).astype(np.int64) << shift
    rows = np.arange(len(run_end))
    for back in range(1, 8):
        rows = rows[length[rows] > back]
        if not len(rows):
            break
        assembled[rows] += (group[run_end[rows] - back] & np.uint8(0x1F)).astype(np.int64) << (shift[rows] - 5 * back)
    negative = (tail & np.uint8(0x10)) != 0
    return assembled - np.where(negative, np.int64(1) << (5 * length), 0)
