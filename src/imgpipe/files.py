"""Small file-system helpers shared by the DAG build and the stages."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


def walk_files(folder: Path | str) -> list[Path]:
    """Every file below `folder`, recursively, symlinked folders followed, in sorted order.

    (Path.rglob on Python < 3.13 silently skips symlinked subfolders.)
    """
    folder = Path(folder)
    files = []
    for root, _dirs, names in os.walk(folder, followlinks=True):
        files.extend(Path(root) / name for name in names)
    return sorted((path for path in files if path.is_file()), key=lambda path: path.relative_to(folder).as_posix())


def error_text(error: BaseException) -> str:
    """'TypeName: message', or the type name alone when the message is empty."""
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def prepend_to_pythonpath(folder: str) -> None:
    """Put `folder` first on PYTHONPATH, for the processes this one starts."""
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [folder, os.environ.get("PYTHONPATH")]))


def read_optional_json(path: Path | str | None, what: str) -> dict | None:
    """A JSON file that adds information but is not needed: None when absent; damaged, a warning."""
    if path is None or not Path(path).is_file():
        return None
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        log.warning("%s '%s' cannot be read (%s); going on without it. Rerun the job that writes it to restore %s",
                    what, path, error_text(error), what)
        return None

