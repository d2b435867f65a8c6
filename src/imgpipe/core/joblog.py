"""Logging for pipeline jobs: one file per job under logs/, tracebacks included."""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path

QUIET_LOGGERS = ("urllib3", "PIL", "matplotlib", "alembic", "mlflow", "git", "filelock", "icrawler.storage")


def configure_logging(log_path: Path | str, level: int = logging.INFO) -> None:
    """Log to the job's log file and stderr; an uncaught exception goes into the file too.

    Snakemake points at the log file when a job fails, so the traceback must be there.
    """
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text("")  # a new log per run of the job; then appended to (O_APPEND), so that
    # processes it starts (data-parallel training's workers) add their lines without overwriting ours
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=[logging.FileHandler(log_path, mode="a"), logging.StreamHandler(sys.stderr)],
        force=True,
    )
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.captureWarnings(True)

    def log_uncaught(kind, error, traceback):
        logging.getLogger("imgpipe").critical("job failed: %s: %s", kind.__name__, error,
                                              exc_info=(kind, error, traceback))

    sys.excepthook = log_uncaught
    # A job killed by its scheduler (SIGTERM) unwinds like Ctrl-C, so its MLflow run is
    # marked FAILED instead of staying RUNNING forever.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)


def _exit_on_sigterm(signum, frame):
    raise SystemExit(f"killed by signal {signal.Signals(signum).name}")
