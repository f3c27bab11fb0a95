"""``python -m nestpatch``."""

from .cli import main

main()
