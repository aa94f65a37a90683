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
