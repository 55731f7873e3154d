"""The ``xfer`` command: parse, call the library, print. Nothing is implemented here.

One module per group of subcommands (``state``, ``lab``, ``bench``, ``agent``,
``ebpf``, ``hypervisor``; the manager's in ``xfer.cli.manager``), all on the app
of ``common``.

Exit status: 0 success, 1 the operation failed (one-line reason on stderr), 2 usage.
"""

from __future__ import annotations

import logging
import sys
from typing import NoReturn

import typer

try:  # typer >= 0.2x carries its own copy of click
    from typer._click.exceptions import ClickException
except ImportError:  # pragma: no cover - older typer depends on click
    from click.exceptions import ClickException  # type: ignore[no-redef]

from xfer import heap
from xfer.cli.common import app, fail, run
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
    """Console entry point: map errors to exit codes and one-line messages (JSON with --json)."""
    logging.basicConfig(level=logging.WARNING, format="xfer: %(message)s")
    heap.keep_freed_memory()  # MB-sized buffers without page faults inside the pause window
    run.json_errors = "--json" in sys.argv[1:]
    if len(sys.argv) > 1 and sys.argv[1] in _PAUSE_WINDOW:
        app.registered_groups = []
        app.registered_commands = [c for c in app.registered_commands if c.name == sys.argv[1]]
    try:
        # Not standalone: usage errors come here, to be printed as JSON under --json.
        code = app(standalone_mode=False)
    except ClickException as exc:
        _usage_error(exc)
    except UsageError as exc:
        fail(str(exc), 2)
    except XferError as exc:
        fail(str(exc), 1)
    except (KeyboardInterrupt, typer.Abort):
        fail("interrupted", 130)
    if isinstance(code, int) and code:
        raise SystemExit(code)


def _usage_error(exc: ClickException) -> NoReturn:
    if run.json_errors:
        fail(exc.format_message(), exc.exit_code)
    try:
        from typer import rich_utils

        rich_utils.rich_format_error(exc)
    except ImportError:
        exc.show()
    raise SystemExit(exc.exit_code)


__all__ = ["app", "main"]
