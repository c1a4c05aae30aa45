"""``python -m twamerge`` (and ``torchrun -m twamerge``) runs the CLI."""

from .cli import main

main()
