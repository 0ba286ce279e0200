"""Workload backends: ``local`` (the local Ray cluster of ``kaiten up``); ``kuberay`` is open work."""
