"""One tiny-model registry with two adapters and one server over it, shared by the load and cancellation tests."""

from __future__ import annotations

import pytest

from tests.reliability.servers import start, two_adapter_registry


@pytest.fixture(scope="session")
def served(tiny_model, tmp_path_factory):
    s = start(two_adapter_registry(tiny_model, tmp_path_factory.mktemp("served")), SERVE_MAX_MODEL_LEN="512")
    yield s
    s.stop()
