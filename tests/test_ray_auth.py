"""The local Ray a job starts by default (pipeline.ray_runtime.ensure_ray, as `make demo` runs it): token
authentication on, every Ray process listening on loopback only, and a client without the token refused
(by the GCS and by the dashboard's HTTP API), while one with the token gets in.

The cluster runs in a subprocess with its own HOME (the token lands in HOME/.ray/auth_token, never the
user's) and none of the test session's RAY_AUTH_MODE=disabled."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from pipeline.ray_runtime import LOOPBACK_ENV

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 180  # wall-clock bound on a shared 2-core machine
CLIENT_TIMEOUT_S = 120
LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}

#: The default path, then a report of what it started: auth mode, addresses, every listening socket of the
#: driver and its Ray processes. Stays up until the test removes its info file's sibling "stop".
CLUSTER = """
import json, os, sys, time, psutil, ray
from pipeline.ray_runtime import ensure_ray
from ray._raylet import AuthenticationMode, get_authentication_mode
ensure_ray(num_cpus=1)
node = ray._private.worker.global_worker.node
me = psutil.Process()
listen = set()
for p in [me] + me.children(recursive=True):
    try:
        listen |= {(p.name(), c.laddr.ip, c.laddr.port) for c in p.net_connections(kind="inet")
                   if c.status == psutil.CONN_LISTEN}
    except psutil.Error:
        pass
info = {"token_mode": get_authentication_mode() == AuthenticationMode.TOKEN, "gcs": node.gcs_address,
        "dashboard": node.address_info["webui_url"], "nodes": [n["NodeManagerAddress"] for n in ray.nodes()],
        "listen": sorted(listen)}
out = sys.argv[1]
open(out + ".tmp", "w").write(json.dumps(info))
os.replace(out + ".tmp", out)
while os.path.exists(out):
    time.sleep(0.2)
"""
CLIENT = """
import sys, ray
ray.init(address=sys.argv[1], log_to_driver=False)
print("CONNECTED", ray.cluster_resources().get("CPU"))
"""


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """No RAY_* of the test session; loopback addressing (else a client resolves 127.0.0.1 to the interface)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return {**env, "HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(REPO), LOOPBACK_ENV: "0",
            **extra}


@pytest.fixture
def default_cluster(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    info = tmp_path / "info.json"
    temp = tempfile.mkdtemp(prefix="rayauth-", dir="/tmp")  # short: Ray's socket paths must fit 107 chars
    proc = subprocess.Popen([sys.executable, "-c", CLUSTER, str(info)], cwd=REPO,
                            env=clean_env(home, TMPDIR=temp), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not info.exists():
            if proc.poll() is not None:
                pytest.fail("the default local Ray did not start:\n" + proc.stdout.read().decode()[-3000:])
            assert time.monotonic() < deadline, "the default local Ray did not start in time"
            time.sleep(0.2)
        yield json.loads(info.read_text()), home
    finally:
        info.unlink(missing_ok=True)  # the driver shuts its cluster down
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def connect(address: str, home: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CLIENT, address], cwd=REPO, env=clean_env(home, **env),
                          capture_output=True, text=True, timeout=CLIENT_TIMEOUT_S)


def dashboard_status(url: str, token: str | None) -> int:
    request = urllib.request.Request(f"http://{url}/api/jobs/")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_default_local_ray_has_token_auth_and_listens_on_loopback_only(default_cluster, tmp_path):
    info, home = default_cluster
    assert info["token_mode"], "token authentication is off in the default local Ray"
    token = (home / ".ray" / "auth_token").read_text().strip()
    assert token
    assert info["gcs"].startswith("127.0.0.1:") and info["nodes"] == ["127.0.0.1"], info
    beyond = [entry for entry in info["listen"] if entry[1] not in LOOPBACK]
    assert not beyond, f"listening beyond loopback: {beyond}"
    assert len(info["listen"]) >= 4, info["listen"]  # GCS, raylet, dashboard, agents: the check saw them

    stranger = tmp_path / "stranger"
    stranger.mkdir()
    refused = connect(info["gcs"], stranger)  # no token anywhere
    assert refused.returncode != 0 and "CONNECTED" not in refused.stdout
    assert "token" in (refused.stderr + refused.stdout).lower(), refused.stderr[-2000:]
    wrong = connect(info["gcs"], stranger, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * len(token))
    assert wrong.returncode != 0 and "CONNECTED" not in wrong.stdout
    assert dashboard_status(info["dashboard"], None) in (401, 403)
    assert dashboard_status(info["dashboard"], "0" * len(token)) in (401, 403)

    admitted = connect(info["gcs"], home, RAY_AUTH_MODE="token")  # a client of the user with ~/.ray/auth_token
    assert admitted.returncode == 0 and "CONNECTED" in admitted.stdout, admitted.stderr[-2000:]
    assert dashboard_status(info["dashboard"], token) == 200
