"""Mergeable picks of a few expressions worth looking at: the best, the worst and the rejected ones.

Each scoring block keeps its own top few; `+` merges two picks and keeps the top few of both, so the
gallery is chosen without ever collecting all expressions on the driver. Ties and the choice among
rejected expressions follow a hash of the expression's key, spreading the picks over the data set
deterministically.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from pipeline.score.metrics import ExpressionScores

KINDS = ("best", "worst", "rejected")
DEFAULT_PER_KIND = 4


def decision_label(failed_reason: str | None, rejected: bool) -> str:
    """What the model answered for an expression: "seg", "rej", or why there is no answer."""
    return failed_reason or ("rej" if rejected else "seg")


@dataclass
class CaseBook:
    """Up to `per_kind` cases per kind; a case is a JSON-able dict (key, text, IoU, masks as RLE)."""

    per_kind: int = DEFAULT_PER_KIND
    cases: dict[str, list[dict]] = field(default_factory=lambda: {k: [] for k in KINDS})

    @staticmethod
    def _order(kind: str, case: dict) -> tuple:
        if kind == "best":
            return (-case["iou"], case["rank"])
        if kind == "worst":
            return (case["iou"], case["rank"])
        return (case["rank"],)

    def _keep(self, kind: str, candidates: list[dict]) -> list[dict]:
        return sorted(candidates, key=lambda c: self._order(kind, c))[: self.per_kind]

    @classmethod
    def from_block(cls, scores: ExpressionScores, rows: pa.Table, decisions: list[str],
                   per_kind: int = DEFAULT_PER_KIND) -> CaseBook:
        """Pick from one block. `rows` (aligned with `scores`) holds dataset, expression_id, image_id, split,
        text, gt_mask, mask, rank (int) and source (the task shard's path); `decisions` see `decision_label`.
        Only the picked rows are converted to Python."""
        book = cls(per_kind=per_kind)
        target = ~scores.no_target
        ok = ~scores.failed
        rank = rows.column("rank").to_numpy(zero_copy_only=False).astype(np.int64)
        pools = {
            "best": np.flatnonzero(target & ok),
            "worst": np.flatnonzero(target),
            "rejected": np.flatnonzero(ok & np.array([d == "rej" for d in decisions], dtype=bool)),
        }
        for kind, idx in pools.items():
            if not len(idx):
                continue
            if kind == "best":
                order = np.lexsort((rank[idx], -scores.iou[idx]))
            elif kind == "worst":
                order = np.lexsort((rank[idx], scores.iou[idx]))
            else:
                order = np.argsort(rank[idx], kind="stable")
            picked = idx[order[:per_kind]]
            book.cases[kind] = [
                dict(row, no_target=bool(scores.no_target[k]), decision=decisions[k], iou=float(scores.iou[k]))
                for k, row in zip(picked, rows.take(pa.array(picked, pa.int64())).to_pylist())]
        return book

    def __add__(self, other: CaseBook) -> CaseBook:
        per_kind = max(self.per_kind, other.per_kind)
        merged = CaseBook(per_kind=per_kind)
        for kind in KINDS:
            merged.cases[kind] = merged._keep(kind, self.cases[kind] + other.cases[kind])
        return merged

    def to_dict(self) -> dict:
        return {"per_kind": self.per_kind, "cases": self.cases}

    @classmethod
    def from_dict(cls, d: dict) -> CaseBook:
        return cls(per_kind=d["per_kind"], cases={k: list(d["cases"].get(k, [])) for k in KINDS})

    def image_keys(self) -> dict[str | None, set[tuple[str, str]]]:
        """Task-shard path -> (dataset, image_id) of the picked cases: the only images the gallery reads."""
        out: dict[str | None, set[tuple[str, str]]] = {}
        for kind in KINDS:
            for c in self.cases[kind]:
                out.setdefault(c["source"], set()).add((c["dataset"], c["image_id"]))
        return out
