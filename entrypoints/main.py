"""MLproject entry point `main`: one full ptq run with MLproject's parameters (see MLproject)."""

import sys

from ptq.cli import main

if __name__ == "__main__":
    sys.argv = [sys.argv[0], "run", *sys.argv[1:]]
    main()
