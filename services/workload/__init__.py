"""Workload: Ray Serve deployments and tuning jobs, readiness written back (issue 7).

Not built yet: this package only reserves its place in the layout.
"""
