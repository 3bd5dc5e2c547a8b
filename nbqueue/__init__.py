"""nbqueue: a job runner that feels at home in a Jupyter notebook.

Send task signatures to a broker, run them on workers (threads of this kernel or
``nbqueue worker`` processes), read states and results from a result backend, and
build group/chain/chord workflows. The default needs no server: an SQLite file.

Imported in IPython (a notebook's kernel), it registers the display of results: a live view.
"""
import sys

from . import states
from .app import App
from .canvas import Signature, chain, chord, group
from .context import current_task
from .errors import (
    BrokerError,
    CodeNotAllowed,
    ConfigurationError,
    ConnectionLost,
    DeadlockError,
    MessageError,
    NbqueueError,
    NotRegistered,
    PayloadCorrupt,
    PayloadError,
    PayloadMissing,
    PayloadTooLarge,
    PublishRefused,
    ResultNotFound,
    Retry,
    SerializationError,
    SignatureError,
    SoftTimeLimitExceeded,
    TaskFailed,
    TaskRevoked,
    TimeLimitExceeded,
    UnsupportedOperation,
    WorkerLostError,
)
from .result import AsyncResult, ChainResult, ChordResult, GroupResult
from .retry import Backoff

__version__ = "0.1.0"

__all__ = [
    "App", "Signature", "group", "chain", "chord", "Retry", "Backoff", "states", "current_task",
    "AsyncResult", "GroupResult", "ChainResult", "ChordResult",
    "NbqueueError", "BrokerError", "ConnectionLost", "PublishRefused", "ConfigurationError", "SerializationError",
    "MessageError", "NotRegistered", "TaskFailed", "TaskRevoked", "SignatureError", "UnsupportedOperation",
    "ResultNotFound",
    "DeadlockError", "progress", "export_notebook",
    "CodeNotAllowed", "WorkerLostError", "TimeLimitExceeded", "SoftTimeLimitExceeded",
    "PayloadError", "PayloadMissing", "PayloadCorrupt", "PayloadTooLarge",
]


def progress(result):
    """Show a live progress view of any result in a notebook (text in a terminal)."""
    from .notebook.widgets import progress as _progress

    return _progress(result)


def export_notebook(path, out=None) -> str:
    """The notebook's tasks, with the code they need, as an importable module's text; written to ``out`` if given.

    See nbqueue.notebook.export: names that cannot be resolved are listed, not guessed.
    """
    from .notebook.export import export_notebook as _export

    return _export(path, out)


def _display_data(result, include=None, exclude=None) -> dict:
    """IPython's display data of a result: the notebook layer's live view (see nbqueue.notebook.widgets)."""
    from .notebook.widgets import mimebundle

    return mimebundle(result, include, exclude)


def register_display(shell=None) -> bool:
    """Show results through the notebook layer in IPython shell ``shell`` (default: the running
    one): registers a display formatter for each result type, so the core never imports the
    notebook layer. Returns False when there is no shell (IPython is never imported here)."""
    if shell is None:
        if "IPython" not in sys.modules:
            return False
        shell = sys.modules["IPython"].get_ipython()
        if shell is None:
            return False
    formatter = shell.display_formatter.mimebundle_formatter
    for kind in (AsyncResult, GroupResult, ChainResult, ChordResult):
        formatter.for_type(kind, _display_data)
    return True


def load_ipython_extension(ipython):
    """``%load_ext nbqueue``: registers %%task and %nbqueue, and the display of results."""
    from .notebook.magics import load_ipython_extension as _load

    register_display(ipython)
    _load(ipython)


def unload_ipython_extension(ipython):
    """``%unload_ext nbqueue``."""
    from .notebook.magics import unload_ipython_extension as _unload

    _unload(ipython)


register_display()
