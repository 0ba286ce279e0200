"""Errors of the bus itself. The taxonomy handlers raise (:class:`~shared.errors.Transient`,
:class:`~shared.errors.InvalidInput`) is :mod:`shared.errors`: the kube and ARM helpers raise it too."""

from __future__ import annotations


class BusUnavailable(Exception):
    """NATS could not be reached within the connect timeout."""
