import pytest

from tests.distributed import get_pool, shutdown_pools


@pytest.fixture(scope="session")
def pool2():
    """Two gloo ranks, shared by every test of the session."""
    return get_pool(2)


@pytest.fixture(scope="session")
def pool4():
    """Four gloo ranks, shared by every test of the session."""
    return get_pool(4)


def pytest_sessionfinish(session, exitstatus):
    shutdown_pools()
