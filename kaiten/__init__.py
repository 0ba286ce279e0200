"""What users run: the ``kaiten`` command line (:mod:`kaiten.cli`) and the real components it starts on
one machine (:mod:`kaiten.local`: NATS, etcd + kube-apiserver, Ray, a node), also the test suite's.

The top layer: it may import :mod:`services` (``kaiten plan`` runs the planner's algorithm, ``kaiten up``
starts the services) and :mod:`shared`; neither imports it (``lint-imports``)."""
