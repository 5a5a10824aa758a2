"""Source formats -> task rows, as pure functions over parsed files.

Each reader (`grefcoco`, `refcoco`, `manifest`; `shapes` generates gRefCOCO-format files) turns a source
into ImageItems (`items.py`): light, JSON-serialisable per-image work items built on the driver.
`items.to_task_row` turns one into a TASK_SCHEMA row (rasterising masks), which prepare runs in parallel.
"""
