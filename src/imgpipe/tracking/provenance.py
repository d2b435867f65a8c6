"""Where a result came from: imgpipe's version, the workflow's git commit, a config hash.

Recorded in every model directory (model_card.json) and on every MLflow model run, so a
model found months later can be traced to the code and the settings that made it; and per
invocation in results/<experiment>/provenance/ (the resolved config, the versions, the
installed packages), which the invocation's MLflow run holds too.
"""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import yaml

from imgpipe import __version__
from imgpipe.tracking.tags import redact_secrets

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


def installed_packages() -> list[str]:
    """`name==version` of every distribution installed for this Python, sorted: what
    `pip freeze` lists, read from package metadata (no pip process, works where pip is not)."""
    found: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found.setdefault(name.lower().replace("_", "-"), f"{name}=={dist.version}")
    return [found[key] for key in sorted(found)]


def write_provenance(folder: Path | str, config: dict, workflow_folder: Path | str | None) -> Path:
    """Write config.resolved.yaml (secrets redacted), environment.json (imgpipe's version,
    Python, platform, the workflow checkout's git commit or null) and requirements.txt
    (installed packages) into `folder`; returns it. Rewritten by every invocation: they
    describe the last one, whose MLflow run keeps its own copy."""

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    plain = json.loads(json.dumps(redact_secrets(config), default=str))  # YAML-safe types only
    (folder / "config.resolved.yaml").write_text(yaml.safe_dump(plain, sort_keys=False, allow_unicode=True),
                                                 encoding="utf-8")
    environment = {
        "imgpipe_version": VERSION,
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "platform": platform.platform(),
        "git": git_commit(workflow_folder) if workflow_folder is not None else None,
        "config_hash": config_hash(config),
    }
    (folder / "environment.json").write_text(json.dumps(environment, indent=1) + "\n", encoding="utf-8")
    header = f"# installed for {sys.executable} (as `pip freeze` lists them)\n"
    (folder / "requirements.txt").write_text(header + "\n".join(installed_packages()) + "\n", encoding="utf-8")
    return folder
