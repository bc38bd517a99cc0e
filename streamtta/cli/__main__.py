"""``python -m streamtta.cli`` = the ``streamtta`` command."""
import sys

from streamtta.cli import main

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
