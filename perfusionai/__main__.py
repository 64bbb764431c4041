"""``python -m perfusionai`` runs the command line (used by Slicer's PythonSlicer)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
