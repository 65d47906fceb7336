import pytest


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory):
    """One MLflow database per test module: creating its tables takes seconds."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"
