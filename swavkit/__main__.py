"""``python -m swavkit`` and ``torchrun -m swavkit``."""

import sys

from swavkit.cli import main

sys.exit(main())
