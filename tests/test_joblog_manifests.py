import subprocess
import sys

import pandas as pd

from imgpipe.core.manifests import read_manifest


def test_manifests_keep_class_names_as_written(tmp_path):
    path = tmp_path / "m.csv"
    pd.DataFrame({"file": ["a.png", "b.png"], "class": ["3", "NA"], "reason": ["", "corrupt"]}).to_csv(path, index=False)
    manifest = read_manifest(path)
    assert manifest["class"].tolist() == ["3", "NA"] and manifest["reason"].tolist() == ["", "corrupt"]


def test_a_failing_job_leaves_its_traceback_in_the_log_file(tmp_path):
    log = tmp_path / "logs" / "job.log"
    script = (
        "import logging\n"
        "from imgpipe.core.joblog import configure_logging\n"
        f"configure_logging({str(log)!r})\n"
        "logging.getLogger('imgpipe.test').info('working on cat')\n"
        "raise ValueError('bad image in data/cat/7.jpg')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode != 0
    text = log.read_text()
    assert "working on cat" in text
    assert "ValueError: bad image in data/cat/7.jpg" in text and "Traceback" in text
    assert "bad image in data/cat/7.jpg" in result.stderr


def test_a_job_killed_with_sigterm_unwinds_so_cleanup_runs(tmp_path):
    # job_run marks its MLflow run FAILED on the way out; that needs an exception, not a silent death.
    script = (
        "import os, signal, time\n"
        "from imgpipe.core.joblog import configure_logging\n"
        f"configure_logging({str(tmp_path / 'job.log')!r})\n"
        "try:\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(10)\n"
        "finally:\n"
        "    print('cleanup ran', flush=True)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert "cleanup ran" in result.stdout
    assert result.returncode != 0 and "SIGTERM" in result.stderr
