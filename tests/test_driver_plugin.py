"""A new driver plugs in through the registry alone (docs/drivers.md): the toy driver of
tests/plugins/toy, a package like those under nbqueue/drivers/, is found by its URL scheme,
passes the broker contract suite, and runs under the engine contract suite through a
SplitEngine (it has no fused engine) with SQLite results."""
import os

import pytest

import nbqueue.drivers as registry
from nbqueue.engine import SplitEngine
from nbqueue.testing import contracts
from nbqueue.testing import engine as engine_contracts

PLUGINS = os.path.join(os.path.dirname(__file__), "plugins")

# the broker and engine contract suites, run on the toy driver by the fixtures below
globals().update({name: test for name, test in vars(contracts).items() if name.startswith("test_broker_")})
globals().update({name: test for name, test in vars(engine_contracts).items() if name.startswith("test_engine_")})


@pytest.fixture(autouse=True)
def toy_driver(monkeypatch):
    """The toy driver's package among the driver packages, the registry read afresh."""
    monkeypatch.setattr(registry, "__path__", [*registry.__path__, PLUGINS])
    monkeypatch.setattr(registry, "_drivers", {})
    return registry.drivers()["toy"]


@pytest.fixture
def toy_url(request):
    return f"toy://{request.node.name}"


@pytest.fixture
def broker_factory(toy_url):
    return lambda: registry.broker_from_url(toy_url)


@pytest.fixture
def engine_factory(toy_url, tmp_path):
    return lambda: registry.engine_for(registry.broker_from_url(toy_url),
                                       registry.backend_from_url(f"sqlite:///{tmp_path}/results.db"))


def test_the_registry_finds_a_driver_package_by_its_scheme(toy_driver):
    assert registry.driver_for("toy://x", "broker") is toy_driver
    assert toy_driver.broker == "nbqueue.drivers.toy.broker:ToyBroker" and toy_driver.backend is None
    assert type(registry.broker_from_url("toy://x")).__name__ == "ToyBroker"
    with pytest.raises(registry.ConfigurationError, match="unknown result backend URL scheme .toy."):
        registry.backend_from_url("toy://x")


def test_a_driver_without_a_fused_engine_runs_through_a_split_engine(engine_factory):
    assert isinstance(engine_factory(), SplitEngine)


def test_an_app_runs_tasks_on_the_new_driver(toy_url, tmp_path):
    import nbqueue

    app = nbqueue.App(toy_url, f"sqlite:///{tmp_path}/results.db")

    @app.task
    def add(x, y):
        return x + y

    result = add.delay(2, 3)
    assert app.worker().step() == 1
    assert result.get(timeout=10) == 5
    app.close()
