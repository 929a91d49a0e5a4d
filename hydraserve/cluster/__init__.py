"""Cluster backends: where instances run (local processes, Kubernetes pods)."""
