"""eplb: expert-parallel load balancing planner (pure planning on the CPU; never imports moe_ep).

``rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus, **options)`` is a drop-in
for DeepSeek's open ``eplb.rebalance_experts``; see docs/eplb.md.
"""
from .io import load_placement, load_stats, save_placement
from .metrics import (balancedness, balancedness_per_layer, experts_moved, gpu_load, lower_bound_balancedness,
                      max_load_lower_bound, plan_balancedness)
from .movement import minimize_movement
from .rebalance import POLICIES, rebalance_experts

__all__ = [
    "rebalance_experts", "POLICIES", "minimize_movement",
    "gpu_load", "balancedness", "balancedness_per_layer", "plan_balancedness",
    "max_load_lower_bound", "lower_bound_balancedness", "experts_moved",
    "load_stats", "save_placement", "load_placement",
]
