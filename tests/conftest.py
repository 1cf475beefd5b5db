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


@pytest.fixture
def world1():
    """A one-rank gloo group in the test process itself, destroyed after the test."""
    import os

    import torch.distributed as dist

    from tests.distributed import free_port

    if dist.is_initialized():
        yield dist.group.WORLD
        return
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(free_port())
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()
