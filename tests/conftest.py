import pytest


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory):
    """One MLflow database per test module: creating its tables takes seconds."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A project with tiny boundary and recognition models, trained and registered (serving_helpers)."""
    from serving_helpers import make_store

    yield from make_store(tmp_path_factory)


@pytest.fixture(scope="module")
def servers(store):
    """`mlflow models serve` for both registered champions on loopback ports (serving_helpers)."""
    from serving_helpers import run_servers

    yield from run_servers(store)
