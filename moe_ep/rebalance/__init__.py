"""Online expert-parallel load balancing: stats window -> plan -> transfer -> atomic swap.

    rebalancer.py      Rebalancer: the window cadence, attempts and their records
    decide.py          Decider: plan on EP rank 0, broadcast, vote over the world
    move.py            WeightMover: weights moved at once or layer by layer (moe_ep.migration)
    phases.py          PhaseSwitcher: timestep-aware placements and the switch decision
    record.py          RebalanceRecord: one frozen record per outcome (summary.json `rebalances`)
    balancedness.py    layer_balancedness (eplb.plan_balancedness per layer)
    placement_file.py  read_placement_file (an offline `python -m eplb plan` placement)
"""
from .balancedness import layer_balancedness
from .placement_file import read_placement_file
from .rebalancer import Rebalancer
from .record import Attempted, Balancedness, RebalanceRecord

__all__ = ["Attempted", "Balancedness", "RebalanceRecord", "Rebalancer", "layer_balancedness",
           "read_placement_file"]
