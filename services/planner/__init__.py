"""Planner: turns each observed Workspace generation into a plan (or a rejection) — issue 3.

Its pure core: :mod:`.planning` (``plan(workspace, catalogs, inventory) -> Plan | Rejection``) and
:mod:`.sizing` (the memory model, and KAITO's rule kept as a reference); ``kaiten plan`` runs the same
code without a cluster. The shell wires it to the bus: it consumes ``workspace.observed`` /
``workspace.deleting``, reads bring-your-own nodes from the apiserver, keeps the latest plan per
Workspace in NATS KV and publishes ``plan.resolved`` / ``plan.rejected``. The Plan type the provisioner
and the workload read is in :mod:`shared.planning.model`.
"""
