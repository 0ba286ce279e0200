"""Tiny Ray Serve applications the tests deploy (imported by Ray replicas from the repository root)."""
