"""`python -m edgefed`: the same as the `edgefed` command."""

from edgefed.cli.app import main

if __name__ == "__main__":
    main()
