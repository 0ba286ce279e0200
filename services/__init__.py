"""Kaiten's services; each is a package run as ``python -m services.<name>``."""
