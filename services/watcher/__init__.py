"""Watcher: list+watch Workspaces, publish observed/deleting, and write status back (status writer)."""
