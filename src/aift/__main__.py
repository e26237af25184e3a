"""`python -m aift ...` is the same as the `aift` command."""

import sys

from aift.cli import main

if __name__ == "__main__":
    sys.exit(main())
