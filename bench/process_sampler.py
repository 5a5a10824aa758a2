"""CPU time and memory of this process and its descendants (a local Ray's GCS, raylet and workers), for the
benchmarks: sampled in a background thread, split by a marker in a process's title (Ray names an actor's
process after its class, e.g. "ray::MapWorker(MapBatches(PredictStage))")."""

from __future__ import annotations

import threading
import time

import psutil


def process_tree() -> list[psutil.Process]:
    me = psutil.Process()
    return [me] + me.children(recursive=True)


def title(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:
        return ""


class ProcessTreeCPU:
    """CPU seconds (user + system) used between begin() and end(), in total and by processes whose title
    contains `marker`; processes that exit in between are not counted."""

    def __init__(self, marker: str):
        self.marker = marker
        self.start: dict[int, float] = {}

    def _cpu(self) -> dict[int, tuple[float, bool]]:
        out = {}
        for p in process_tree():
            try:
                t = p.cpu_times()
                out[p.pid] = (t.user + t.system, self.marker in title(p))
            except psutil.Error:
                pass
        return out

    def begin(self) -> None:
        self.start = {pid: cpu for pid, (cpu, _) in self._cpu().items()}

    def end(self) -> tuple[float, float]:
        total = marked = 0.0
        for pid, (cpu, is_marked) in self._cpu().items():
            used = cpu - self.start.get(pid, 0.0)
            total += used
            marked += used if is_marked else 0.0
        return total, marked


def private_key(name: str) -> str:
    """The sample key of a marked group's private RSS: "replicas_mb" -> "replicas_private_mb"."""
    return name.removesuffix("_mb") + "_private_mb"


def private_mb(p: psutil.Process) -> tuple[float, float]:
    """(RSS, private RSS) in MB. Private = RSS less shared pages (Linux: file-backed and shared memory): a Ray
    worker reading objects zero-copy from the object store (/dev/shm) counts those pages in its RSS, although
    they are the store's, mapped once per machine."""
    info = p.memory_info()
    return info.rss / 2**20, (info.rss - getattr(info, "shared", 0)) / 2**20


class RSSSampler:
    """Every `interval_s`: the driver's RSS, the RSS of each process whose title contains one of `markers`
    (by marker), and the largest other Ray worker (by RSS, and by private RSS: `private_mb`); `samples` is the
    time series, `peaks` the maxima."""

    def __init__(self, markers: dict[str, str], interval_s: float = 5.0):
        self.markers, self.interval_s = markers, interval_s
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._t0 = 0.0

    def _sample(self) -> dict:
        me = psutil.Process()
        driver, driver_private = private_mb(me)
        row: dict = {"t_s": round(time.monotonic() - self._t0, 1), "driver_mb": round(driver, 1),
                     "driver_private_mb": round(driver_private, 1)}
        for name in self.markers:
            row[name] = []
            row[private_key(name)] = []
        other = other_private = 0.0
        for p in me.children(recursive=True):
            try:
                rss, private = private_mb(p)
            except psutil.Error:
                continue
            text = title(p)
            hit = next((name for name, marker in self.markers.items() if marker in text), None)
            if hit:
                row[hit].append(round(rss, 1))
                row[private_key(hit)].append(round(private, 1))
            elif text.startswith("ray::"):
                other, other_private = max(other, rss), max(other_private, private)
        row["largest_other_worker_mb"] = round(other, 1)
        row["largest_other_worker_private_mb"] = round(other_private, 1)
        return row

    def _run(self) -> None:
        while True:
            self.samples.append(self._sample())
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self) -> RSSSampler:
        self._t0 = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(self._sample())

    def peaks(self) -> dict:
        out = {key: max(s[key] for s in self.samples) for key in (
            "driver_mb", "driver_private_mb", "largest_other_worker_mb", "largest_other_worker_private_mb")}
        for name in [*self.markers, *map(private_key, self.markers)]:
            out[name] = max((max(s[name]) for s in self.samples if s.get(name)), default=0.0)
        return out
