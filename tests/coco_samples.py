"""Small datasets written in the real gRefCOCO / RefCOCO file formats, with known masks and known bad items.

Shared by the format and prepare tests. Every bad entry is one named case the readers must skip and count.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline import masks

W1, H1 = 12, 10  # image 1 (non-square on purpose)
W2, H2 = 8, 8  # image 2
SQUARE_101 = [1.0, 1.0, 6.0, 1.0, 6.0, 5.0, 1.0, 5.0]
POLY_201 = [0.0, 0.0, 4.0, 0.0, 4.0, 4.0]


def crowd_mask() -> np.ndarray:
    m = np.zeros((H1, W1), bool)
    m[6:9, 2:10] = True
    return m


def rle_mask() -> np.ndarray:
    m = np.zeros((H1, W1), bool)
    m[0:3, 8:12] = True
    return m


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's iscrowd format: column-major run lengths, starting with a run of zeros."""
    flat = mask.flatten(order="F").astype(np.uint8)
    counts, current, run = [], 0, 0
    for v in flat:
        if v != current:
            counts.append(run)
            current, run = v, 0
        run += 1
    counts.append(run)
    return {"size": [mask.shape[0], mask.shape[1]], "counts": counts}


def instances() -> dict:
    compressed = masks.encode(rle_mask())
    return {
        "images": [
            {"id": 1, "file_name": "img1.png", "width": W1, "height": H1},
            {"id": 2, "file_name": "img2.png", "width": W2, "height": H2},
            {"id": 3, "file_name": "../../escape.png", "width": W2, "height": H2},
            {"id": 4, "file_name": "img4.png"},  # corrupt: no width/height
            {"id": 5, "file_name": "missing.png", "width": W2, "height": H2},  # file never written
            {"file_name": "no-id.png"},  # corrupt: no id
        ],
        "annotations": [
            {"id": 101, "image_id": 1, "category_id": 1, "segmentation": [SQUARE_101], "iscrowd": 0,
             "bbox": [1.0, 1.0, 5.0, 4.0]},
            {"id": 102, "image_id": 1, "category_id": 1, "segmentation": uncompressed_rle(crowd_mask()),
             "iscrowd": 1, "bbox": [2.0, 6.0, 8.0, 3.0]},
            {"id": 103, "image_id": 1, "category_id": 2, "segmentation": compressed, "iscrowd": 1},
            {"id": 201, "image_id": 2, "category_id": 1, "segmentation": [POLY_201], "iscrowd": 0},
            {"id": 202, "image_id": 2, "category_id": 1, "segmentation": "garbage", "iscrowd": 0},
            {"id": 203, "image_id": 99, "category_id": 1, "segmentation": [POLY_201], "iscrowd": 0},
            {"id": 301, "image_id": 3, "category_id": 1, "segmentation": [POLY_201], "iscrowd": 0},
            {"id": 401, "image_id": 4, "category_id": 1, "segmentation": [POLY_201], "iscrowd": 0},
            {"id": 501, "image_id": 5, "category_id": 1, "segmentation": [POLY_201], "iscrowd": 0},
            {"image_id": 1, "segmentation": [POLY_201]},  # corrupt: no id
        ],
        "categories": [{"id": 1, "name": "thing"}, {"id": 2, "name": "other"}],
    }


def _sent(sent_id: int, text: str) -> dict:
    return {"sent_id": sent_id, "sent": text, "raw": text, "tokens": text.split()}


def grefs() -> list[dict]:
    """gRefCOCO refs: multi-target with crowd, RLE single, no-target both ways, and one of each bad case."""
    return [
        {"ref_id": 1, "image_id": 1, "ann_id": [101, 102], "split": "val", "sentences":
            [_sent(1, "the square and the bar"), _sent(2, "both things")]},
        {"ref_id": 2, "image_id": 1, "ann_id": [103], "split": "val", "sentences": [_sent(3, "top right")]},
        {"ref_id": 3, "image_id": 1, "ann_id": [-1], "split": "val", "sentences": [_sent(4, "the dog")]},
        {"ref_id": 4, "image_id": 2, "ann_id": [201], "split": "testA", "no_target": False,
         "sentences": [_sent(5, "the triangle"), _sent(6, "   ")]},
        {"ref_id": 5, "image_id": 2, "ann_id": [-1], "no_target": True, "split": "testA",
         "sentences": [_sent(7, "a unicorn")]},
        {"ref_id": 6, "image_id": 2, "ann_id": [-1], "split": "testA", "sentences": []},
        {"ref_id": 7, "image_id": 2, "ann_id": [202], "split": "testA", "sentences": [_sent(8, "corrupt")]},
        {"ref_id": 8, "image_id": 2, "ann_id": [999], "split": "testA", "sentences": [_sent(9, "unknown")]},
        {"ref_id": 9, "image_id": 77, "ann_id": [201], "split": "testA", "sentences": [_sent(10, "no image")]},
        {"ref_id": 10, "image_id": 3, "ann_id": [301], "split": "testA", "sentences": [_sent(11, "escape")]},
        {"ref_id": 11, "image_id": 2, "ann_id": [101], "split": "testA", "sentences": [_sent(12, "elsewhere")]},
        {"ref_id": 12, "image_id": 5, "ann_id": [501], "split": "testA", "sentences": [_sent(13, "missing")]},
    ]


#: reason -> (items, expressions) that `grefs()` + `instances()` must skip when every split is read.
#: An image whose path escapes the root (image 3) is not skipped but flagged (kept with its reason); a
#: "missing image" (image 5) is flagged only when the images are checked (prepare), not by the pure readers.
EXPECTED_SKIPS = {
    "corrupt image entry": (1, 0),
    "corrupt annotation entry": (1, 0),
    "empty sentence": (1, 1),
    "ref without sentences": (1, 0),
    "corrupt annotation": (1, 1),
    "unknown annotation": (1, 1),
    "unknown image": (1, 1),
    "annotation of another image": (1, 1),
}


def refcoco_refs() -> list[dict]:
    """RefCOCO refs: one int ann_id each."""
    return [
        {"ref_id": 1, "image_id": 1, "ann_id": 101, "split": "testA", "category_id": 1,
         "file_name": "COCO_x_1_101.jpg", "sentences": [_sent(21, "left square"), _sent(22, "the square")]},
        {"ref_id": 2, "image_id": 1, "ann_id": 102, "split": "testB", "sentences": [_sent(23, "the bar")]},
        {"ref_id": 3, "image_id": 2, "ann_id": 201, "split": "val", "sentences": [_sent(24, "triangle")]},
        {"ref_id": 4, "image_id": 2, "ann_id": 999, "split": "val", "sentences": [_sent(25, "nothing")]},
    ]


def write_images(root: Path, names: dict[str, tuple[int, int]]) -> None:
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, (w, h) in names.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "images" / name)


def write_grefcoco(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "grefs(unc).json").write_text(json.dumps(grefs()))
    (root / "instances.json").write_text(json.dumps(instances()))
    write_images(root, {"img1.png": (W1, H1), "img2.png": (W2, H2)})
    return root


def write_refcoco(root: Path, split_by: str = "unc") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / f"refs({split_by}).p").write_bytes(pickle.dumps(refcoco_refs(), protocol=2))
    (root / "instances.json").write_text(json.dumps(instances()))
    write_images(root, {"img1.png": (W1, H1), "img2.png": (W2, H2)})
    return root
