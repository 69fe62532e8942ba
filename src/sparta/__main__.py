"""``python -m sparta``: the same command line as the ``sparta`` script."""

from .cli import main

if __name__ == "__main__":
    main()
