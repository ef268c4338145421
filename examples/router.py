"""The router, as the Go original's example: tunnels on :8887, HTTP on :8888.

    python examples/router.py

The same as ``python -m ptth_sync.router``; it takes the same options.
"""

import sys

from ptth_sync.router.server import main

if __name__ == "__main__":
    sys.exit(main())
