"""``python -m smlt`` is the ``smlt`` command."""

from smlt.cli import main

main()
