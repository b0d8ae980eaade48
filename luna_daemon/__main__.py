"""``python -m luna_daemon`` -> the CLI."""

import sys

from luna_daemon.cli import main

if __name__ == "__main__":
    sys.exit(main())
