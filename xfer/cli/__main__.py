"""``python -m xfer.cli``."""

from xfer.cli import main

main()
