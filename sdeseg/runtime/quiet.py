"""What reaches the console: sdeseg's own lines, and from the libraries only what tells the user something.

By default the known noise is silenced: DeepSpeed below ERROR (its "Setting accelerator to
CPU" on every CPU worker), Ray Train's INFO lines (worker group started, every checkpoint and
report echoed with its metrics), and deprecation chatter that torch, DeepSpeed and Ray raise
about each other's internals. ``runtime.verbose`` (``sdeseg -v``) keeps all of it. The driver
calls :func:`setup_console` (the CLI); every Ray Train worker calls :func:`quiet_libraries`
first thing, and Ray Train takes :func:`train_log_level`.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

# (category, module regex of where the warning is attributed): warnings about library internals
# that the user cannot act on (torch.distributed deprecations reached through DeepSpeed, ...)
NOISY_WARNINGS = (
    (FutureWarning, r"(torch|deepspeed|ray)(\..*)?$"),
    (DeprecationWarning, r"(torch|deepspeed|ray)(\..*)?$"),
)
DEEPSPEED_LOGGER = "DeepSpeed"


class _BelowError(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


def quiet_libraries(verbose: bool) -> None:
    """Silence the known noise in this process (no-op when ``verbose``); idempotent.

    DeepSpeed resets its logger's level when imported, so a filter (which it keeps) does it.
    Some Ray Train modules name their logger by file path (``logging.getLogger(__file__)``),
    so ``LoggingConfig`` misses them and a worker echoes every report with all its metrics:
    those loggers, when Ray is loaded, go to WARNING.
    """
    if verbose:
        return
    ds = logging.getLogger(DEEPSPEED_LOGGER)
    if not any(isinstance(f, _BelowError) for f in ds.filters):
        ds.addFilter(_BelowError())
    for category, module in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", category=category, module=module)
    ray = sys.modules.get("ray")
    if ray is not None and getattr(ray, "__file__", None):
        ray_dir = os.path.dirname(ray.__file__) + os.sep
        for name in list(logging.root.manager.loggerDict):
            if name.startswith(ray_dir) and name.endswith(".py"):
                logging.getLogger(name).setLevel(logging.WARNING)


def train_log_level(verbose: bool) -> str:
    """Ray Train's console level (``RunConfig(logging_config=LoggingConfig(...))``)."""
    return "INFO" if verbose else "WARNING"


class _Console(logging.StreamHandler):
    """Plain lines on whatever ``sys.stderr`` is at the time (tests swap it)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_console(verbose: bool) -> None:
    """The CLI's console: ``sdeseg`` log lines (progress, warnings) on stderr, plain; the
    libraries quieted unless ``verbose``. The ``sdeseg`` logger still propagates (to handlers
    an embedding application or pytest installs)."""
    logger = logging.getLogger("sdeseg")
    if not any(isinstance(h, _Console) for h in logger.handlers):
        logger.addHandler(_Console())
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    quiet_libraries(verbose)
