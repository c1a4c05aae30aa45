"""``python -m twamerge`` (and ``torchrun -m twamerge``) runs the CLI."""

import sys

from .distributed import quiet_other_ranks

quiet_other_ranks(sys.argv)

from .cli import main  # noqa: E402

main()
