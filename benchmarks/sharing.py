"""Memory sharing benchmark: ``python benchmarks/sharing.py [--json] [--model-mb 320] [--clients 3]``.

Same as ``luna-daemon bench --memory``; see luna_daemon/bench.py for what is measured.
"""
import sys

from luna_daemon.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--memory", *sys.argv[1:]]))
