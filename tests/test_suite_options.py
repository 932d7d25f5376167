"""The suite's own switches are pytest options (tests/conftest.py), not environment variables: --full, --reuse-demo."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import DEMO, FULL, ROOT, demo_size


def test_probe_prints_the_sizes_this_session_runs_at(pytestconfig):
    """Run alone by the tests below; it prints what a test module sees when it imports the sizes."""
    print("SIZES " + json.dumps({"full": FULL, "demo": list(DEMO.overrides), "min_gain": DEMO.min_gain_points,
                                 "reuse_demo": pytestconfig.getoption("reuse_demo")}))


def _probe(*options: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNESTACK_")}
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", *options,
                        f"{__file__}::test_probe_prints_the_sizes_this_session_runs_at"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    return json.loads(next(line for line in p.stdout.splitlines() if line.startswith("SIZES "))[6:])


def test_full_sizes_the_runs_and_the_default_is_ci_size():
    assert _probe() == {"full": False, "demo": ["training.epochs=2"], "min_gain": 50, "reuse_demo": None}
    assert _probe("--full", "--reuse-demo=/tmp/demo") == {"full": True, "demo": [], "min_gain": 60,
                                                          "reuse_demo": "/tmp/demo"}


def test_the_sizes_follow_the_option():
    assert demo_size(True).overrides == () and demo_size(True).min_tuned == 0.875  # the demo as shipped
    assert demo_size(False).overrides == ("training.epochs=2",) and demo_size(False).min_tuned < 0.875


def test_help_documents_both_options():
    p = subprocess.run([sys.executable, "-m", "pytest", "--help", "-p", "no:cacheprovider"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    text = " ".join(p.stdout.split())
    assert "--full run the integration and reliability tests at full size" in text
    assert "--reuse-demo=DIR reuse the demo run in DIR" in text
