"""``python -m fleet``: the same command line as the ``fleet`` script (for a venv whose
scripts folder is not on PATH, or to pick the interpreter explicitly)."""

from fleet.cli import main

if __name__ == "__main__":
    main(prog_name="fleet")
