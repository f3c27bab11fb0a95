"""``python -m nestpatch.cli``."""

from . import main

main()
