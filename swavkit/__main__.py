"""``python -m swavkit`` and ``torchrun -m swavkit``."""

import sys

from swavkit.cli.main import main

sys.exit(main())
