"""Object storage for runs: where a run's files live when ``runtime.storage_path`` is a URL.

Shards and manifests are read from ``data.root`` and checkpoints are written by Ray Train to
``<storage_path>/<run name>/``; this module puts the rest of a run there as well, under
``<storage_path>/<run name>/run/``: the resolved ``config.yaml``, ``metrics.jsonl``,
``summary.json`` and ``export/*``. Workers on any node write their scratch files locally and
rank 0 uploads; the driver downloads the results into the local run directory at the end. No
directory needs to be shared between nodes.

URLs are fsspec URLs (``s3://``, ``gs://``, ...); credentials come from the standard
environment of each library (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``,
``AWS_ENDPOINT_URL`` for an S3-compatible server, an instance or service-account role;
``GOOGLE_APPLICATION_CREDENTIALS`` or workload identity for GCS). :func:`check_storage`
turns the usual ways this goes wrong into one-line errors before any worker starts.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from sdeseg.config import ConfigError


def is_url(path: str | os.PathLike | None) -> bool:
    return path is not None and "://" in str(path) and not str(path).startswith("file://")


def _fs(url: str):
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as e:  # s3fs / gcsfs not installed
        scheme = url.split("://", 1)[0]
        extra = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}.get(scheme)
        hint = f" (pip install 'sdeseg[{extra}]')" if extra else ""
        raise ConfigError(f"{url}: no filesystem for {scheme}:// is installed{hint}: {e}") from e


def describe_error(url: str, e: BaseException) -> str:
    """One line saying why ``url`` could not be used: missing credentials, an unreachable
    endpoint, a bucket that does not exist, access denied, or the error itself."""
    text = f"{type(e).__name__}: {e}"
    names = {c.__name__ for c in type(e).__mro__}
    chain = e
    while chain.__cause__ is not None or chain.__context__ is not None:
        chain = chain.__cause__ or chain.__context__
        names |= {c.__name__ for c in type(chain).__mro__}
        text += f" / {type(chain).__name__}: {chain}"
    low = text.lower()
    if names & {"NoCredentialsError", "PartialCredentialsError"} or "unable to locate credentials" in low:
        return (f"{url}: no credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                "or give the pod a service account role; for GCS GOOGLE_APPLICATION_CREDENTIALS)")
    if names & {"EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError", "ConnectionError"} \
            or "could not connect" in low or "connection refused" in low:
        endpoint = os.environ.get("AWS_ENDPOINT_URL", "the storage endpoint")
        return f"{url}: cannot reach {endpoint} ({type(e).__name__})"
    if "nosuchbucket" in low or "bucket does not exist" in low or "specified bucket does not exist" in low:
        return f"{url}: the bucket does not exist"
    if names & {"PermissionError"} or "accessdenied" in low or "forbidden" in low or "invalidaccesskeyid" in low \
            or "signaturedoesnotmatch" in low:
        return f"{url}: access denied with the configured credentials ({type(e).__name__})"
    return f"{url}: {type(e).__name__}: {e}"


def check_storage(url: str, key: str, write: bool = True) -> None:
    """Make sure ``url`` can be listed (and written, with ``write``) before workers start;
    raises :class:`ConfigError` naming ``key`` and the URL with the reason."""
    if not is_url(url):
        return
    fs, path = _fs(url)
    probe = f"{path.rstrip('/')}/.sdeseg-write-probe-{uuid.uuid4().hex[:8]}"
    try:
        fs.ls(path.split("/", 1)[0], detail=False)  # raises what exists() would swallow: credentials, endpoint
        if write:
            fs.pipe_file(probe, b"ok")
            fs.rm_file(probe)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - every backend raises its own types; describe_error names them
        raise ConfigError(f"{key}: {describe_error(url, e)}") from e


def join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *(p.strip("/") for p in parts)])


class RunStore:
    """A run's files under ``<storage_path>/<run name>/run/`` (see the module docstring)."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.fs, self.root = _fs(self.url)

    @classmethod
    def for_run(cls, storage_path: str | None, run_name: str) -> RunStore | None:
        """The store of a run whose ``storage_path`` is a URL; None for local storage."""
        return cls(join(storage_path, run_name, "run")) if is_url(storage_path) else None

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def uri(self, rel: str) -> str:
        return join(self.url, rel)

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    def put(self, local: str | Path, rel: str) -> str:
        """Upload ``local`` to ``rel`` (under a temporary name, then moved: readers never see a
        half-written object on filesystems where moves are atomic); returns its URL."""
        tmp = self.path(f"{rel}.tmp-{uuid.uuid4().hex[:8]}")
        self.fs.put_file(str(local), tmp)
        self.fs.mv(tmp, self.path(rel))
        return self.uri(rel)

    def get(self, rel: str, local: str | Path) -> Path:
        """Download ``rel`` to ``local`` atomically."""
        local = Path(local)
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.tmp-{uuid.uuid4().hex[:8]}")
        self.fs.get_file(self.path(rel), str(tmp))
        tmp.replace(local)
        return local

    def list(self, rel: str) -> list[str]:
        """Names of the files directly under ``rel`` (empty when it does not exist)."""
        try:
            entries = self.fs.ls(self.path(rel), detail=False)
        except FileNotFoundError:
            return []
        return sorted(Path(e).name for e in entries if ".tmp-" not in Path(e).name)

    def pull(self, rel: str, local_dir: str | Path) -> list[Path]:
        """Download every file under ``rel`` into ``local_dir``."""
        return [self.get(f"{rel}/{name}", Path(local_dir) / name) for name in self.list(rel)]


def fetch(url: str, cache_dir: str | Path | None = None) -> Path:
    """A local copy of the file at ``url`` (an fsspec URL), downloaded once into ``cache_dir``
    (default ``~/.cache/sdeseg/downloads``) under a name derived from the URL."""
    import hashlib

    cache = Path(cache_dir or Path.home() / ".cache" / "sdeseg" / "downloads")
    fs, path = _fs(url)
    try:
        info = fs.info(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{url} does not exist") from e
    except Exception as e:  # noqa: BLE001 - see describe_error
        raise FileNotFoundError(describe_error(url, e)) from e
    version = f"{url}\n{info.get('size')}\n{info.get('ETag') or info.get('LastModified') or info.get('mtime')}"
    local = cache / f"{hashlib.sha256(version.encode()).hexdigest()[:16]}-{Path(path).name}"
    if local.is_file():
        return local
    cache.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f".{local.name}.tmp-{uuid.uuid4().hex[:8]}")
    fs.get_file(path, str(tmp))
    tmp.replace(local)
    return local
