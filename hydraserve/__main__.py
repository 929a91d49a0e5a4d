"""``python -m hydraserve``: the ``hydraserve`` command."""

from hydraserve.cli.main import main

if __name__ == "__main__":
    main()
