"""The broker, result-backend and engine contract suites, run on every implementation."""
from nbqueue.testing.contracts import *  # noqa: F401,F403
from nbqueue.testing.engine import *  # noqa: F401,F403
