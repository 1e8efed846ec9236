"""What the job-level tests share: the repo's paths, the quickstart config and the tiny model
they pin (seed-initialised, 3 MoE layers x 8 experts, top-2, one shared expert, no checkpoint),
whatever the quickstart's demo model is (tests/test_demo.py tests that one)."""
from __future__ import annotations

import json
import os
import socket

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "configs", "quickstart.json")

TINY_MODEL = {"hidden_size": 64, "num_layers": 3, "num_heads": 4, "moe_every": 1, "dense_hidden_size": 128,
              "in_channels": 4, "patch_size": 2, "text_dim": 64, "max_prompt_tokens": 32, "dtype": "float32",
              "seed": 0, "moe": {"num_experts": 8, "top_k": 2, "expert_hidden_size": 64, "num_shared_experts": 1}}
# the override that puts the tiny model into a config: config.load(QUICKSTART, [TINY_MODEL_SET, ...])
TINY_MODEL_SET = f"model={json.dumps(TINY_MODEL)}"


def free_port() -> int:
    """A TCP port nobody listens on now (for a launcher's --master_port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_rank(rank: int, world: int, config: str, overrides: list[str]) -> None:
    """One gloo rank of a CPU job (for tests/mp.run_ranks): `config` with `overrides`, job.run."""
    import torch

    from moe_ep import config as config_mod
    from moe_ep.job import run
    from moe_ep.parallel import build_context

    cfg = config_mod.load(config, overrides)
    run(cfg, build_context(cfg.parallel, rank, world, torch.device("cpu")), progress=False)
