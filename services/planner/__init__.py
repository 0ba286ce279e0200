"""Planner: presets and GPU SKUs into a plan that fits (issue 3).

Not built yet: this package only reserves its place in the layout.
"""
