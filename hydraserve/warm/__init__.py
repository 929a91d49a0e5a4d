"""A warm runtime per node: a process that has imported the engine forks each worker, and
every Python process a worker starts, instead of a fresh interpreter (decision 0600)."""
