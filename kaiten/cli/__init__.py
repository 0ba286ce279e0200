"""The ``kaiten`` command line."""
