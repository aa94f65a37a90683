import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
# Two threads alone; one per worker when pytest-xdist runs two workers on the two cores.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)
torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Torch on one thread for the test (tests that compare numbers across processes or many small ops)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Module fixtures that load the real model, compile or export: the tests that share one run on one xdist worker
# (tools/test.sh passes `--dist loadgroup`), so each is built once, not once on every worker that draws one of
# its tests.
SHARED_BUILDS = ("compiled", "decode_graphs", "prefill_graphs", "results", "smollm2")


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the marks into the node ids
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if any(name in item.fixturenames for name in SHARED_BUILDS):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
