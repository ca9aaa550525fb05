"""A longer fuzz run of the parsers' properties (tests/unit/test_hostile_input.py).

    python bench/fuzz.py [--examples N]

The suite runs each property with 300 examples; this runs them with N (default 20,000) and
prints what hypothesis found: a failing example is a parser that raised something other than
InvalidArgument (or ResourceExhausted for a limit) on hostile input.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=20_000)
    args = parser.parse_args()
    env = {**os.environ, "SNAKEPIT_FUZZ_EXAMPLES": str(args.examples)}
    started = time.monotonic()
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
               "tests/unit/test_hostile_input.py", "-k", "fuzz", "--timeout", "0"]  # fmt: skip
    code = subprocess.run(command, cwd=ROOT, env=env).returncode
    print(f"{args.examples} examples per property in {time.monotonic() - started:.0f} s: "
          f"{'nothing found' if code == 0 else 'FOUND a failing example (above)'}")  # fmt: skip
    return code


if __name__ == "__main__":
    sys.exit(main())
