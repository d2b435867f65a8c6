"""Where a result came from: imgpipe's version, the workflow's git commit, a config hash.

Recorded in every model directory (model_card.json) and on every MLflow model run, so a
model found months later can be traced to the code and the settings that made it.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

from imgpipe import __version__

VERSION = __version__


def git_commit(folder: Path | str = ".") -> dict | None:
    """{'commit': sha, 'dirty': bool} of the git checkout holding `folder`; None outside one
    (an installed package, a copied folder) or where git is not installed."""
    try:
        commit = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
        if commit.returncode != 0:
            return None
        status = subprocess.run(["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


def config_hash(config: dict) -> str:
    """sha256 (first 16 hex digits) of a config as canonical JSON: key order does not change it."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
