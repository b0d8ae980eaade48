"""Transport benchmark: ``python benchmarks/transport.py [--json] [--repeats N]``.

Same as ``luna-daemon bench --json``; see luna_daemon/bench.py for what is measured.
"""
import sys

from luna_daemon.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
