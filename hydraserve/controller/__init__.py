"""The planner: pipeline size, per-worker memory, placement and bandwidth admission.

Pure code, called by the operator, the embedded platform and the simulator alike.
"""
