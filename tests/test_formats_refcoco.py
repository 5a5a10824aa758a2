"""RefCOCO-family reader: refs pickles through the restricted unpickler, single targets, split-bys."""

import os
import pickle

import pytest

from pipeline import masks
from pipeline.prepare.formats import refcoco
from pipeline.prepare.formats.items import SkipReport, SourceError
from tests import coco_samples as cs


class _RunsCode:
    """A pickle that would run a shell command on a plain `pickle.load`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_before_running(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps([{"ref_id": 1, "evil": _RunsCode(marker)}], protocol=2)
    with pytest.raises(refcoco.UnsafePickleError, match="refused to load .*system"):
        refcoco.restricted_loads(payload)
    assert not marker.exists()
    with pytest.raises(refcoco.UnsafePickleError, match=r"refused to load (__builtin__|builtins)\.eval"):
        refcoco.restricted_loads(pickle.dumps(eval, protocol=2))
    with pytest.raises(SourceError, match="refs.p is not a readable pickle"):
        refcoco.restricted_loads(payload[:20], "refs.p")


def test_python2_str_pickle_loads_as_latin1_text():
    # Protocol 2 as Python 2 writes it: SHORT_BINSTRING ('U') for str, here holding latin-1 byte 0xe9.
    py2 = b"\x80\x02]q\x00}q\x01(U\x04sentq\x02U\x04caf\xe9q\x03U\x06ann_idq\x04K\x07ua."
    assert refcoco.restricted_loads(py2) == [{"sent": "caf\u00e9", "ann_id": 7}]


def test_plain_containers_round_trip():
    data = [{"a": (1, 2.5, None, True), "b": {3, 4}, "d": frozenset({5}), "e": "\u00e9"}]
    assert refcoco.restricted_loads(pickle.dumps(data, protocol=2)) == data
    data[0]["c"] = b"x"  # protocol 2 would pickle bytes through _codecs.encode, which stays refused
    assert refcoco.restricted_loads(pickle.dumps(data, protocol=5)) == data


def test_refcoco_rows(tmp_path):
    root = cs.write_refcoco(tmp_path / "refcoco")
    skips = SkipReport()
    rows = refcoco.read_task_rows(str(root), dataset="refcoco", skips=skips)
    by_key = {(r["image_id"], r["split"]): r for r in rows}
    assert sorted(by_key) == [("1", "testA"), ("1", "testB"), ("2", "val")]  # one row per (image, split)
    left = by_key[("1", "testA")]
    assert [e["expression_id"] for e in left["expressions"]] == ["21", "22"]
    square = masks.decode(masks.from_polygons([cs.SQUARE_101], cs.H1, cs.W1))
    assert all((masks.decode(e["gt_mask"]) == square).all() and e["no_target"] is False
               for e in left["expressions"])
    crowd = by_key[("1", "testB")]["expressions"][0]
    assert (masks.decode(crowd["gt_mask"]) == cs.crowd_mask()).all()
    assert left["dataset"] == "refcoco"
    assert skips.items["unknown annotation"] == 1 and skips.expressions["unknown annotation"] == 1


def test_split_by_files_and_validation(tmp_path):
    root = cs.write_refcoco(tmp_path / "refcocog", split_by="umd")
    rows = refcoco.read_task_rows(str(root), dataset="refcocog", splits=frozenset({"val"}))
    assert [(r["image_id"], r["split"], r["dataset"]) for r in rows] == [("2", "val", "refcocog")]
    with pytest.raises(ValueError, match="released with split-by unc"):
        refcoco.read_items(str(root), dataset="refcoco+", split_by="umd")
    with pytest.raises(FileNotFoundError):
        refcoco.read_items(str(root), dataset="refcocog", split_by="google")


def test_malformed_refs_are_skipped(tmp_path):
    skips = SkipReport()
    refs = [{"ref_id": 1, "image_id": 1, "ann_id": [101], "split": "val", "sentences": []},
            "not a dict", {"ref_id": 3, "ann_id": 101, "sentences": []}]
    assert refcoco.load_items(refs, cs.instances(), images_root=str(tmp_path), skips=skips) == []
    assert skips.items["corrupt ref"] == 3
