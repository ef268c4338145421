"""``python -m ptth_sync.router``."""

import sys

from .server import main

sys.exit(main())
