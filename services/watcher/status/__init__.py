"""The status writer: turns every status-bearing event into Workspace status and Kubernetes Events."""
