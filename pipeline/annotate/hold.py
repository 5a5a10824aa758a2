"""A test-only hold point: the writer stops at a known place so a fault test can inject its fault there.

Why: a fault test that kills a job "after a poll interval" races the job (on a fast run every file is done
between two polls). With the hold, the writer pauses once N input files are complete, announces it, and
waits until the test says go, so the fault always lands at the same point.

Off unless GSVA_TEST_HOLD_DIR names a folder (Ray workers inherit it from the process that starts Ray, or
get it from a runtime_env) AND that folder holds an ARMED file with N in it (a test writes it, so one
session-wide folder serves many tests). Then every write task that reaches the writer once N input files
are complete creates HELD and waits until RELEASE exists (or HOLD_TIMEOUT_S passed: a crashed test never
leaves a job hanging forever) or ARMED is gone; no further file completes meanwhile.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

DIR_ENV = "GSVA_TEST_HOLD_DIR"
ARMED, HELD, RELEASE = "armed", "held", "release"
HOLD_TIMEOUT_S = 600.0
POLL_S = 0.05


def maybe_hold(completed_files: Callable[[], int]) -> None:
    """Wait here while a hold is active, or start one once `completed_files()` reaches the armed count.

    `completed_files` (it lists storage) is only called while a hold is armed and not yet held."""
    folder = Path(os.environ[DIR_ENV]) if os.environ.get(DIR_ENV) else None
    if folder is None or not (folder / ARMED).exists() or (folder / RELEASE).exists():
        return
    if not (folder / HELD).exists():
        if completed_files() < int((folder / ARMED).read_text()):
            return
        (folder / HELD).write_text(f"{os.getpid()}\n")
    deadline = time.monotonic() + HOLD_TIMEOUT_S
    while (folder / ARMED).exists() and not (folder / RELEASE).exists() and time.monotonic() < deadline:
        time.sleep(POLL_S)


class HoldControl:
    """The test's side of one hold folder: arm, wait until held, release, reset."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def env(self) -> dict[str, str]:
        return {DIR_ENV: str(self.folder)}

    def arm(self, after_files: int) -> None:
        self.reset()
        (self.folder / ARMED).write_text(str(after_files))

    def wait_until_held(self, alive: Callable[[], bool], timeout_s: float) -> None:
        """Block until a writer is held; fails if the job ended first or never got there."""
        deadline = time.monotonic() + timeout_s
        while not (self.folder / HELD).exists():
            if not alive():
                raise AssertionError("the job ended before it reached the hold point")
            if time.monotonic() > deadline:
                raise AssertionError(f"the job did not reach the hold point within {timeout_s:.0f} s")
            time.sleep(POLL_S)

    def release(self) -> None:
        (self.folder / RELEASE).write_text("go\n")

    def reset(self) -> None:
        """Disarm: remove every control file (a held writer goes on, none holds again)."""
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True, exist_ok=True)
