"""pytest fixtures; the matrix and helpers live in testing.py."""

import pytest
from testing import DEVICES


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param
