"""Export's quiet mode is scoped to the export call: the process's logging and warnings come back unchanged."""

from __future__ import annotations

import logging
import warnings

import pytest
from transformers.utils import logging as hf_logging

from export.__main__ import NOISY_LOGGERS, _quiet, main


@pytest.fixture
def logging_state():
    """Non-default levels everywhere quiet mode reaches, restored after the test."""
    root, noisy = logging.getLogger(), logging.getLogger("torch.onnx")
    saved = root.level, noisy.level, hf_logging.get_verbosity()
    root.setLevel(logging.INFO)
    noisy.setLevel(logging.DEBUG)
    hf_logging.set_verbosity_warning()
    yield root, noisy
    root.setLevel(saved[0])
    noisy.setLevel(saved[1])
    hf_logging.set_verbosity(saved[2])


def _state(root, noisy):
    return root.level, noisy.level, hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled(), \
        list(warnings.filters)


@pytest.mark.parametrize("ok", [True, False], ids=["merge", "refused"])
def test_export_call_leaves_logging_as_it_found_it(ok, logging_state, tiny_run, tmp_path, capsys):
    root, noisy = logging_state
    before = _state(root, noisy)
    argv = ["merge", str(tiny_run), "--out", str(tmp_path / "merged")] if ok else ["merge", str(tmp_path / "nope")]
    assert main(argv) == (0 if ok else 2)
    assert _state(root, noisy) == before
    assert root.getEffectiveLevel() == logging.INFO  # the regression: it used to stay at ERROR


def test_quiet_silences_the_noisy_loggers_only_inside(logging_state, caplog):
    root, noisy = logging_state
    with _quiet():
        assert all(logging.getLogger(n).level == logging.ERROR for n in NOISY_LOGGERS)
        assert root.level == logging.INFO  # never the root: other code's warnings still show
        noisy.warning("renamed axis")
        logging.getLogger("train").warning("still heard")
    noisy.warning("heard again")
    msgs = [r.getMessage() for r in caplog.records]
    assert "renamed axis" not in msgs and "still heard" in msgs and "heard again" in msgs
