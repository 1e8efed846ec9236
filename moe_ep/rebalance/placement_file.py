"""An offline placement (`python -m eplb plan`) read and checked against this run."""
from __future__ import annotations

import torch

import eplb


def read_placement_file(path: str, num_layers: int, num_experts: int, num_slots: int,
                        ep_size: int) -> torch.Tensor:
    """Read a `python -m eplb plan` placement file (`eplb.load_placement`) checked against this run.

    Returns phy2log [L, R] int64; raises ValueError naming the file and the field.
    """
    expect = {"num_layers": num_layers, "num_experts": num_experts, "num_replicas": num_slots, "num_gpus": ep_size}
    try:
        return torch.from_numpy(eplb.load_placement(path, expect=expect))
    except ValueError as err:
        raise ValueError(f"placement file {path}: {err}") from None
