"""Every path a user names is an `etils.epath` path: a local file or a `gs://bucket/object` (pods keep their
workdirs, data and models in buckets). This module is where the package reads and writes them.

- Reading and writing: `path`, `read_text`/`read_json`, `write_text`/`write_json` (a local file is written
  to a temporary name and renamed; a GCS object appears whole when its upload completes), `glob`.
- Failing fast, before anything compiles: `check_output_dir` (a workdir or export folder) and
  `check_exists` (an input), each a one-line `ConfigError` naming the config field, the path and the remedy.
- Listings are never cached: gcsfs caches a folder's listing forever by default, so one process would not
  see what another wrote (a worker's checkpoint, a resumed run's new steps). `use_listings_cache=False` is
  set as the fsspec default for gs:// (a user's own fsspec config for "gs" wins).
- An emulator: with `STORAGE_EMULATOR_HOST` set (e.g. fake-gcs-server at http://127.0.0.1:4443), every
  client of the package talks to it: gcsfs and google-cloud-storage read that variable themselves; orbax's
  array writer (tensorstore) gets `TENSORSTORE_GCS_HTTP_URL` and a dummy token; and gcsfs's gRPC probe of the
  bucket type, which an emulator never answers (60 s per bucket), is turned off.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from typing import Any

import fsspec.config
from etils import epath

from instructgpt_jax.errors import ConfigError

PathLike = str | os.PathLike


def _use_emulator() -> None:
  host = os.environ.get("STORAGE_EMULATOR_HOST")
  if host:
    os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", host)
    os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")  # an emulator checks no credentials
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


_use_emulator()
fsspec.config.conf.setdefault("gs", {}).setdefault("use_listings_cache", False)


def path(p: PathLike, *parts: str) -> epath.Path:
  """An epath.Path (`p/part/...`); `~` expanded for local paths."""
  text = os.fspath(p)
  return epath.Path(text if is_remote(text) else os.path.expanduser(text)).joinpath(*parts)


def absolute(p: PathLike) -> epath.Path:
  """`p` made absolute against the current folder when local (orbax refuses relative paths); a URI as is."""
  text = os.fspath(p)
  return path(text) if is_remote(text) else epath.Path(os.path.abspath(os.path.expanduser(text)))


def is_remote(p: PathLike) -> bool:
  """True for object-store URIs (gs://, s3://, ...), which have no folders and no rename."""
  return bool(re.match(r"^[a-z][a-z0-9]+://", os.fspath(p)))


def join(p: PathLike, *parts: str) -> str:
  """`p/part/...` as a string (configs and JSON hold strings)."""
  return os.fspath(path(p, *parts))


def read_text(p: PathLike) -> str:
  return path(p).read_text()


def read_json(p: PathLike, default: Any = None) -> Any:
  """The JSON in file `p`, or `default` when there is no such file."""
  p = path(p)
  if not p.exists():
    return default
  return json.loads(p.read_text())


def write_text(p: PathLike, text: str) -> None:
  """Writes `p` whole: a reader never sees half a file, and a crash leaves the old one."""
  p = path(p)
  if is_remote(p):  # an object becomes visible only when its upload completes
    p.write_text(text)
    return
  p.parent.mkdir(parents=True, exist_ok=True)
  tmp = p.parent / f".{p.name}.{uuid.uuid4().hex[:8]}.tmp"  # unique: several processes may write one file
  tmp.write_text(text)
  tmp.replace(p)


def write_json(p: PathLike, obj: Any) -> None:
  write_text(p, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def same_file(a: PathLike, b: PathLike) -> bool:
  """True when `a` and `b` name one existing file (a local path and a link to it, say)."""
  if is_remote(a) or is_remote(b):
    return os.fspath(a) == os.fspath(b) and path(a).exists()
  return path(a).exists() and path(b).exists() and os.path.samefile(path(a), path(b))


def make_dir(p: PathLike) -> None:
  """Creates a local folder (and its parents); a bucket has no folders, so nothing there."""
  if not is_remote(p):
    path(p).mkdir(parents=True, exist_ok=True)


def write_bytes(p: PathLike, data: bytes) -> None:
  p = path(p)
  if not is_remote(p):
    p.parent.mkdir(parents=True, exist_ok=True)
  p.write_bytes(data)


def glob(pattern: str) -> list[str]:
  """The sorted files matching a glob (`*`, `?`, `[...]`; not `**`), local or gs://."""
  pattern = os.fspath(path(pattern.strip()))
  parts = pattern.split("/")
  first = next((i for i, part in enumerate(parts) if re.search(r"[*?\[]", part)), None)
  if first is None:
    return [pattern] if path(pattern).exists() and not path(pattern).is_dir() else []
  root = "/".join(parts[:first]) or ("/" if pattern.startswith("/") else ".")
  if not path(root).is_dir():
    return []
  return sorted(os.fspath(m) for m in path(root).glob("/".join(parts[first:])) if not m.is_dir())


def copy_tree(src: PathLike, dst: PathLike) -> None:
  """Copies every file under `src` to the same relative path under `dst` (local or gs://, either way)."""
  src, dst = path(src), path(dst)
  for child in src.iterdir():
    if child.is_dir():
      copy_tree(child, dst / child.name)
    else:
      write_bytes(dst / child.name, child.read_bytes())


# ------------------------------------------------------------------------------------ checks before compiling


def _bucket(p: str) -> tuple[str, str]:
  scheme, rest = p.split("://", 1)
  return scheme, rest.split("/", 1)[0]


def _check_credentials(field: str, p: str) -> None:
  """Application default credentials must exist for a real bucket (an emulator needs none)."""
  if os.environ.get("STORAGE_EMULATOR_HOST"):
    return
  import google.auth
  import google.auth.exceptions

  try:
    google.auth.default()
  except google.auth.exceptions.DefaultCredentialsError as e:
    reason = str(e).split(". ")[0].rstrip(".")
    raise ConfigError(
      f"{field}: {p}: no Google Cloud credentials ({reason}); run `gcloud auth application-default login`, "
      "set GOOGLE_APPLICATION_CREDENTIALS to a service-account key, or run on a VM with a service account"
    ) from None


def _check_bucket(field: str, p: str) -> None:
  scheme, bucket = _bucket(p)
  if scheme != "gs":
    return
  _check_credentials(field, p)
  try:
    found = epath.Path(f"gs://{bucket}").exists()
  except Exception as e:  # noqa: BLE001  (a denied or failed request: name it in one line)
    raise ConfigError(f"{field}: {p}: cannot reach bucket gs://{bucket} ({type(e).__name__}: {e})") from None
  if not found:
    raise ConfigError(
      f"{field}: {p}: bucket gs://{bucket} does not exist (or these credentials cannot see it); "
      f"create it (`gcloud storage buckets create gs://{bucket}`) or fix the name"
    )


def check_output_dir(p: PathLike, field: str) -> None:
  """A folder the run will write: its bucket exists and is reachable, or its local parent folder exists (the
  folder itself is created; a missing parent is usually a typo)."""
  text = os.fspath(p)
  if not text:
    raise ConfigError(f"{field}: empty; give a local folder or gs://bucket/path")
  if is_remote(text):
    _check_bucket(field, text)
    return
  local = path(text)
  if local.exists() and not local.is_dir():
    raise ConfigError(f"{field}: {text} is a file, not a folder; give a folder")
  parent = epath.Path(os.path.abspath(os.fspath(local))).parent
  if not local.exists() and not parent.is_dir():
    raise ConfigError(f"{field}: {text}: its parent folder {parent} does not exist; create it or fix the path")


def check_exists(p: PathLike, field: str, what: str = "file or folder") -> None:
  """An input path exists (for gs://, after checking its bucket, so the message names the real cause)."""
  text = os.fspath(p)
  if is_remote(text):
    _check_bucket(field, text)
  if not path(text).exists():
    raise ConfigError(f"{field}: {text}: no such {what}")
