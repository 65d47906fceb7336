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


@pytest.fixture
def project(tmp_path, monkeypatch, tracking_uri):
    """A project folder (the working directory) with the toy boundary dataset and a demo params.yaml."""
    from test_boundaries_fixtures import write_data_root

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    write_data_root(tmp_path / "data")
    (tmp_path / "params.yaml").write_text("profile: demo\n")
    return tmp_path
