"""Thin `python -m jobs.X` entry points: parse arguments, build, run."""
