"""Gateway benchmark: overhead and throughput against a fast fake engine, and bursts."""
