"""Shared fixtures: a real local Ray cluster and a real S3-compatible server (SeaweedFS) on loopback."""

from __future__ import annotations

import os

import pytest

# Tests do not exercise Ray's token authentication; the cluster jobs document how to use it.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models on a 2-core machine: one intra-op thread per process avoids oversubscription (Ray workers and
# the test process share the cores); numbers do not depend on it.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def ray_local(request):
    """A small real local Ray cluster. 4 logical CPUs on 2 cores so actor pools never starve reads/writes.

    When any test of the session uses `s3`, the S3 server starts first: Ray workers inherit the environment
    of the moment Ray starts, so its AWS_* credentials must already be there.
    """
    import ray

    if any("s3" in getattr(item, "fixturenames", ()) for item in request.session.items):
        request.getfixturevalue("s3")

    from pipeline.ray_runtime import LOOPBACK, loopback_only

    if not ray.is_initialized():
        loopback_only()
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, _node_ip_address=LOOPBACK,
                 runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", **_hold_control(request).env()}})
    yield ray
    ray.shutdown()


def _hold_control(request):
    """The session's annotate hold folder (pipeline.annotate.hold): its path reaches every Ray worker."""
    from pipeline.annotate.hold import HoldControl

    return HoldControl(request.getfixturevalue("tmp_path_factory").getbasetemp() / "annotate-hold")


@pytest.fixture
def hold(request):
    """Arm/wait/release the annotate writer's hold point; always released and disarmed after the test."""
    control = _hold_control(request)
    control.reset()
    yield control
    control.release()
    control.reset()


@pytest.fixture(scope="session")
def s3():
    """A real SeaweedFS S3 server on loopback, with its credentials in the AWS_* environment."""
    from tests.s3server import start_s3_server

    server = start_s3_server()
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    yield server
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread in the test process is far faster than two
    contended ones (OMP_NUM_THREADS above is too late when torch was imported first)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
