"""Planning: presets and GPU SKUs into a plan that fits, at the lowest cost.

A pure core shared by the planner service (which publishes plans), the provisioner and workload (which
read them) and ``kaiten plan`` (a dry run without a cluster):

- :mod:`.catalog` loads and validates the catalogs (``shared/catalog/*.yaml`` + operator files);
- :mod:`.model` the Plan / Rejection / inventory types;
- :mod:`.sizing` the memory model (and KAITO's rule, kept as a reference);
- :mod:`.planner` ``plan(workspace, catalogs, inventory) -> Plan | Rejection``.
"""
