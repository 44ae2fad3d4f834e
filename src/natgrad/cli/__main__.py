"""``python -m natgrad.cli``: the ``natgrad`` command (``torchrun -m natgrad.cli train ...``)."""

import sys

from natgrad.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
