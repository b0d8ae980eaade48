"""Reliability suite: ``python benchmarks/reliability.py [--quick] [--json]``.

Same as ``luna-daemon bench --reliability``; see docs/reliability.md for what it does and
luna_daemon/reliability/ for the scenarios. Exit code 0 when every check passed, else 1.
"""
import sys

from luna_daemon.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--reliability", *sys.argv[1:]]))
