"""One real local Ray instance for the whole test session (starting Ray costs ~10 s)."""

import os
import signal

import pytest

os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray with 2 CPUs; yields its address so subprocesses (the CLI) can join it."""
    import ray

    from densiray.api import ensure_ray

    ensure_ray(num_cpus=2, log_to_driver=False)
    _sigterm_tears_down()  # ray.init replaced it
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture
def store(tmp_path):
    return str(tmp_path / "models")


def pytest_collection_modifyitems(config, items):
    """Every test that needs the session's Ray instance is slow (Ray alone takes ~10 s to start, a Train
    run tens of seconds): `pytest -m "not slow"` is the quick loop of everything else."""
    for item in items:
        if "ray_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


def _sigterm_tears_down() -> None:
    """SIGTERM (a CI runner's timeout, `kill`) interrupts the session as Ctrl-C does, so that fixtures are
    torn down: the multi-node tests' Ray nodes run in sessions of their own and outlived a killed pytest."""

    def interrupt(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends it at once
        raise KeyboardInterrupt("SIGTERM")

    signal.signal(signal.SIGTERM, interrupt)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Before every test, since a test may replace the handler (Ray's own, a command's and its reset)."""
    _sigterm_tears_down()
