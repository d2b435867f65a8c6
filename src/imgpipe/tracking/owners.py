"""Who owns a run (host, pid, process start time), and closing the runs whose owner is gone.

A process killed with SIGKILL cannot close its run, so every run records its owner
(host, pid, process start time) and each new invocation marks the runs whose owner is
gone KILLED instead of leaving them RUNNING forever.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

from imgpipe.tracking.tags import (
    ABANDONED_TAG,
    HOST_TAG,
    INVOCATION_TAG,
    LAST_INVOCATION_TAG,
    PID_STARTED_TAG,
    PID_TAG,
)

log = logging.getLogger(__name__)


def process_stat_fields(pid: int) -> list[str] | None:
    """Fields 3 onwards of /proc/<pid>/stat (field N at index N - 3); None where unreadable.

    Field 2, the command name, is in parentheses and may itself contain spaces and ')',
    so the fields are counted from its last ')'.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()


def process_start_time(pid: int) -> str:
    """When process `pid` started, in clock ticks since boot (/proc/<pid>/stat field 22).

    '' where there is no /proc (not Linux) or no such process. Together with the pid it
    identifies a process: a pid reused by a later process has a later start time.
    """
    fields = process_stat_fields(pid)
    return fields[22 - 3] if fields else ""


def owner_tags(pid: int | None = None) -> dict[str, str]:
    """Tags naming the process that will close a run (default: this one)."""
    pid = os.getpid() if pid is None else pid
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(pid), PID_STARTED_TAG: process_start_time(pid)}


def process_is_running(pid: int, started: str) -> bool:
    """Whether process `pid` exists and, where `started` is known, is the one that started then.

    A zombie counts as ended: it can no longer close anything. Where it cannot be told
    (no /proc, another user's hidden process), a live pid counts as the owner.
    """
    try:
        os.kill(pid, 0)
        other_users = False
    except ProcessLookupError:
        return False
    except PermissionError:
        other_users = True
    if not Path("/proc/self/stat").exists():
        return True  # not Linux: the pid is all we can compare
    fields = process_stat_fields(pid)
    if fields is None:
        # Gone since os.kill looked, unless /proc hides other users' processes (hidepid).
        return other_users
    state, start_time = fields[3 - 3], fields[22 - 3]
    if state in ("Z", "X"):
        return False
    return not started or start_time == started


def mark_abandoned_runs(client, experiment_id: str, marked_by: str | None = None,
                        failed_invocation: str | None = None) -> list[str]:
    """Mark KILLED the RUNNING runs of this host whose owner process has ended; return their ids.

    Their owner was killed (SIGKILL, the OOM killer, a lost terminal) before it could close
    them. Runs without owner tags (not opened by imgpipe) and runs of other hosts (a cluster
    node whose processes we cannot see) are left alone. One query, then one update per run
    marked: this runs at the start of every invocation. `marked_by` describes the caller
    for the tag on each marked run.

    With `failed_invocation` (a run id), only the runs of that invocation's jobs, marked
    FAILED: Snakemake saw each of its jobs end, so a run still open failed with its job, which
    could not close it (the store was on the disk that filled up).
    """
    status = "FAILED" if failed_invocation else "KILLED"
    this_host = socket.gethostname()
    marked_by = marked_by or f"process {os.getpid()}"
    abandoned = []
    page_token = None
    while True:
        page = client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'",
                                  page_token=page_token)
        for run in page:
            tags = run.data.tags
            if tags.get(HOST_TAG) != this_host:
                continue
            try:
                owner_pid = int(tags[PID_TAG])
            except (KeyError, ValueError):
                continue
            if owner_pid <= 0 or process_is_running(owner_pid, tags.get(PID_STARTED_TAG, "")):
                continue
            if failed_invocation and failed_invocation not in (tags.get(INVOCATION_TAG), tags.get(LAST_INVOCATION_TAG)):
                continue
            reason = (f"process {owner_pid} on host {this_host} ended without closing this run; "
                      f"marked {status} by {marked_by}")
            client.set_tag(run.info.run_id, ABANDONED_TAG, reason)
            client.set_terminated(run.info.run_id, status)
            log.info("MLflow: run '%s' (%s) was left RUNNING by process %d, which has ended; marked %s",
                     run.info.run_name, run.info.run_id, owner_pid, status)
            abandoned.append(run.info.run_id)
        page_token = page.token
        if not page_token:
            return abandoned

