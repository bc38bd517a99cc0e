"""``python -m streamtta ...``: the same as the ``streamtta`` command (:func:`streamtta.cli.main`)."""
import sys

from streamtta.cli import main

if __name__ == "__main__":
    sys.exit(main())
