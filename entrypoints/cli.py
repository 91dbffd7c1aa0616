"""MLproject's entry points (main, sweep, report) call `python -m entrypoints.cli <command> ...`:
the same typer CLI as `ptq`, so parameters are parsed in one place."""

from ptq.cli import main

if __name__ == "__main__":
    main()
