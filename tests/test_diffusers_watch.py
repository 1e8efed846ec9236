"""TransformerWatch: the timestep and guidance branch of each transformer forward, by the family's
pipeline convention (fast, no ranks)."""
from __future__ import annotations

import torch
import torch.nn as nn

from moe_ep.models.diffusers.pipeline import CONVENTIONS, TransformerWatch


class Echo(nn.Module):
    def forward(self, hidden_states, timestep=None, timesteps=None):
        return hidden_states


class Recorder:
    def __init__(self):
        self.seen = []

    def on_forward_begin(self, step, t, info):
        self.seen.append((step, round(t, 4), info["sample_branch"]))

    def on_forward_end(self, step, t, info):
        pass


class Guided:
    do_classifier_free_guidance = True


def test_separate_guidance_uses_call_parity_even_when_steps_share_a_rounded_t():
    module, rec = Echo(), Recorder()
    TransformerWatch(module, CONVENTIONS["nucleusmoe"], rec, Guided())
    x = torch.zeros(2, 3)
    for t in (0.9883, 0.9883, 0.9883, 0.9883, 0.5, 0.5):      # two steps rounded to the same bf16 t
        module(hidden_states=x, timestep=torch.full((2,), t))
    assert rec.seen == [(0, 0.9883, [0, 0]), (0, 0.9883, [1, 1]), (1, 0.9883, [0, 0]), (1, 0.9883, [1, 1]),
                        (2, 0.5, [0, 0]), (2, 0.5, [1, 1])]


def test_batched_guidance_negative_first_and_t_scale():
    module, rec = Echo(), Recorder()
    TransformerWatch(module, CONVENTIONS["hidream"], rec, Guided())
    for t in (1000.0, 500.0):
        module(hidden_states=torch.zeros(4, 3), timesteps=torch.full((4,), t))
    assert rec.seen == [(0, 1.0, [1, 1, 0, 0]), (1, 0.5, [1, 1, 0, 0])]


def test_no_pipeline_means_no_branch_labels():
    module, rec = Echo(), Recorder()
    TransformerWatch(module, CONVENTIONS["nucleusmoe"], rec, None)
    module(hidden_states=torch.zeros(1, 3), timestep=torch.full((1,), 0.3))
    assert rec.seen == [(0, 0.3, None)]
