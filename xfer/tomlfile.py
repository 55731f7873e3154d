"""Reading the TOML files xfer's daemons are configured by."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from xfer.errors import UsageError


def read(path: Path, what: str) -> dict[str, Any]:
    """Parse a TOML file; a missing or malformed file is a UsageError naming ``what`` and why.

    >>> read(Path("/etc/xfer/agent.toml"), "agent config")  # doctest: +SKIP
    """
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"{what} {path} not found") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"{what} {path}: {exc}") from None
