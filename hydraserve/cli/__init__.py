"""The ``hydraserve`` command line; one module per command group."""
