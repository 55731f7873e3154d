"""Reading the files operators write (TOML configuration, the YAML topology): a missing or
malformed file is one line naming the file, and for a syntax error the line and column.

    agent config /etc/xfer/agent.toml:12:9: expected '=' after a key in a key/value pair
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

from xfer.errors import UsageError

# tomllib (3.11) puts the position in the message only: "... (at line 3, column 5)".
_AT = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")


def read(path: Path, what: str) -> dict[str, Any]:
    """Parse a TOML file; a missing or malformed file is a UsageError naming ``what`` and why.

    >>> read(Path("/etc/xfer/agent.toml"), "agent config")  # doctest: +SKIP
    """
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"{what} {path} not found") from None
    except OSError as exc:
        raise UsageError(f"{what} {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        text = str(exc)
        at = _AT.search(text)
        if at is None:
            raise UsageError(f"{what} {path}: {text}") from None
        raise syntax_error(what, path, int(at[1]), int(at[2]), text[:at.start()]) from None


def syntax_error(what: str, path: Path, line: int, column: int, reason: str) -> UsageError:
    """The one-line error for a syntax error at ``line``:``column`` (both from 1).

    >>> str(syntax_error("topology", Path("t.yaml"), 3, 7, "mapping values are not allowed here"))
    'topology t.yaml:3:7: mapping values are not allowed here'
    """
    reason = " ".join(reason.split())
    return UsageError(f"{what} {path}:{line}:{column}: {reason[:1].lower()}{reason[1:]}")
