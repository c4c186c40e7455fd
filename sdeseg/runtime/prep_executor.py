"""Ray-cluster executor for ``data_prep.shards.write_shards``: one Ray task per shard.

``write_shards`` takes any ``run(fn, arglist) -> iterator`` that yields ``fn(*args)``
results as they complete; this one runs each shard conversion as a Ray task, so a
conversion spreads over every node of a cluster (``--ray-address``) or over a local
Ray instance (``--ray``). On a multi-node cluster ``--root`` and ``--out`` must be
storage every node can reach (an fsspec URL such as ``s3://...``, or a shared mount),
and the nodes need sdeseg installed (the cluster image does).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import ray

log = logging.getLogger(__name__)


def ray_executor(
    address: str | None = None,
    *,
    num_cpus_per_task: float = 1.0,
    max_retries: int = 2,
    init_kwargs: dict[str, Any] | None = None,
) -> Callable[[Callable, list[tuple]], Iterator]:
    """An executor for ``write_shards`` that runs each call ``fn(*args)`` as a Ray task.

    Args:
        address: Ray cluster address; None connects to ``RAY_ADDRESS`` or starts a local
            instance. An already initialised Ray (e.g. a test's ``ray.init``) is reused.
        num_cpus_per_task: CPUs reserved per shard task (conversion is single-threaded).
        max_retries: retries of a task whose worker died. Safe because a shard is
            written under a temporary name and renamed only when complete.
        init_kwargs: extra ``ray.init`` arguments when this executor starts Ray.

    Results are yielded in completion order. A task error cancels the tasks not yet
    finished and is re-raised (Ray re-raises the task's own exception type, so
    ``PrepError`` stays catchable). Ray is shut down afterwards only if started here.
    """

    def run(fn: Callable, arglist: list[tuple]) -> Iterator:
        started = not ray.is_initialized()
        if started:
            # the local token-auth warning is noise for a converter (see RUNTIME-NOTES)
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            ray.init(address=address, **(init_kwargs or {}))
        elif address is not None:
            log.warning("Ray is already initialised; ignoring address %s", address)
        try:
            # application errors are not retried: they are deterministic (a bug or bad input)
            task = ray.remote(num_cpus=num_cpus_per_task, max_retries=max_retries, retry_exceptions=False)(fn)
            pending = [task.remote(*args) for args in arglist]
            try:
                while pending:
                    done, pending = ray.wait(pending, num_returns=1)
                    yield ray.get(done[0])
            finally:
                for ref in pending:
                    ray.cancel(ref)
                if pending:
                    # let cancelled tasks clean up their temporary files before the caller goes on
                    ray.wait(pending, num_returns=len(pending), timeout=60)
        finally:
            if started:
                ray.shutdown()

    return run
