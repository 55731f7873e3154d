"""The ``xfer`` command: parse, call the library, print. Nothing is implemented here.

One module per group of subcommands (``state``, ``lab``, ``bench``, ``agent``,
``ebpf``, ``hypervisor``; the manager's in ``xfer.cli.manager``), all on the app
of ``common``.

Exit status: 0 success, 1 the operation failed (one-line reason on stderr), 2 usage.
"""

from __future__ import annotations

import logging
import sys

from xfer import heap
from xfer.cli.common import app, fail
from xfer.errors import UsageError, XferError

# Each module adds its commands to ``app`` when imported, in this order (the order
# of `xfer --help`).
# isort: off
from xfer.cli import state  # noqa: F401
from xfer.cli import hypervisor  # noqa: F401
from xfer.cli import lab  # noqa: F401
from xfer.cli import bench  # noqa: F401
from xfer.cli import agent  # noqa: F401
from xfer.cli import ebpf  # noqa: F401
from xfer.cli import manager  # noqa: F401
# isort: on

# Commands a hypervisor hook runs inside the pause window. typer inspects the
# signature of every registered command at start (~70 ms for all of them), so for
# these only the command itself is built (``common._root`` keeps it a subcommand).
_PAUSE_WINDOW = frozenset({"export", "import", "forget", "notify"})


def main() -> None:
    """Console entry point: map errors to exit codes and one-line messages."""
    logging.basicConfig(level=logging.WARNING, format="xfer: %(message)s")
    heap.keep_freed_memory()  # MB-sized buffers without page faults inside the pause window
    if len(sys.argv) > 1 and sys.argv[1] in _PAUSE_WINDOW:
        app.registered_groups = []
        app.registered_commands = [c for c in app.registered_commands if c.name == sys.argv[1]]
    try:
        app()
    except UsageError as exc:
        fail(str(exc), 2)
    except XferError as exc:
        fail(str(exc), 1)
    except KeyboardInterrupt:
        fail("interrupted", 130)


__all__ = ["app", "main"]
