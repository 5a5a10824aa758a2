"""Finding the real cause of a failure inside whatever Ray wrapped it in.

Why: an error raised in a Ray worker reaches the driver as a RayTaskError (often wrapped again by Ray
Data), with the original as `cause` / `__cause__` and its text inside the message. The jobs turn known
causes (a model that cannot load, storage that is unreachable or full) into one line and an exit status.
"""

from __future__ import annotations

from collections.abc import Iterator


def causes(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and every exception it was caused by or raised during, each once."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        stack.extend([e.__cause__, e.__context__, getattr(e, "cause", None)])


def first_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else ""
