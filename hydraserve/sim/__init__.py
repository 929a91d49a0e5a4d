"""Discrete-event cluster simulator that places every cold start with the real planner.

``simulate(policy, cluster, workload)`` replays a seeded trace; ``hydraserve bench sim`` and
``benchmarks/slo_attainment`` drive it. See ``docs/decisions/0103-cluster-simulator.md``.
"""

from hydraserve.sim.cluster import ClusterSpec, NodeSpec, large_cluster, paper_testbed
from hydraserve.sim.coldstart import simulated_cold_ttft
from hydraserve.sim.policies import POLICIES, Policy
from hydraserve.sim.simulator import SimConfig, SimResult, Simulator, simulate
from hydraserve.sim.workload import Workload, make_workload

__all__ = [
    "POLICIES",
    "ClusterSpec",
    "NodeSpec",
    "Policy",
    "SimConfig",
    "SimResult",
    "Simulator",
    "Workload",
    "large_cluster",
    "make_workload",
    "paper_testbed",
    "simulate",
    "simulated_cold_ttft",
]
