"""Planner: turns each observed Workspace generation into a plan (or a rejection) — issue 3.

The sizing rules are pure and live in :mod:`shared.planning` (the provisioner, the workload and
``kaiten plan`` read the same Plan type); this service wires them to the bus: it consumes
``workspace.observed`` / ``workspace.deleting``, reads bring-your-own nodes from the apiserver, keeps
the latest plan per Workspace in NATS KV and publishes ``plan.resolved`` / ``plan.rejected``.
"""
