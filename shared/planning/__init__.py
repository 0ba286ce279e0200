"""The plan and what it is made from: the types every service reads, and the catalogs.

- :mod:`.catalog` loads and validates the catalogs (``shared/catalog/*.yaml`` + operator files);
- :mod:`.model` the Plan / Rejection / node types;
- :mod:`.inventory` node shapes and label selectors (the planner and the BYO provisioner read nodes).

The algorithm that makes a plan is the planner's (:mod:`services.planner.planning`,
:mod:`services.planner.sizing`); ``kaiten plan`` imports it from there.
"""
