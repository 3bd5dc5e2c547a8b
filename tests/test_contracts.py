"""The broker and result-backend contract suites, run on every implementation."""
from nbqueue.testing.contracts import *  # noqa: F401,F403
