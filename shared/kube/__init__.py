"""Kubernetes helpers: API client construction and Workspace operations."""
