"""``python -m mechsafe`` (and ``torchrun -m mechsafe``): the ``mechsafe`` command."""

import sys

from mechsafe.cli import main

sys.exit(main())
