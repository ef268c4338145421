"""``python -m ptth_sync.backend MODULE:APP``."""

import sys

from .cli import main

sys.exit(main())
