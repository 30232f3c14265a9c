"""``python -m m2mpay``: the same command line as the ``m2mpay`` script."""

import sys

from m2mpay.agents.cli import main

if __name__ == "__main__":
    sys.exit(main())
