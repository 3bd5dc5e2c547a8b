"""A toy driver: an in-memory broker, for the test that plugs a new driver in (test_driver_plugin.py).

Declared as every driver package under nbqueue/drivers/ declares itself (see nbqueue.drivers);
the test puts this folder on ``nbqueue.drivers.__path__``.
"""
NAME = "toy"
SCHEMES = ("toy",)
BROKER = "nbqueue.drivers.toy.broker:ToyBroker"
OPTIONS = frozenset()
EXTRA = None
