"""Backwards-compatible names: the job moved to moe_ep/job.py (it knows no model; the built-in
MoE-DiT is moe_ep/models/moedit.py). Import from moe_ep.job in new code."""
from ..job import (OutputWriteError, PeerLostError, RunInterrupted, STATS_SAVE_EVERY_S,  # noqa: F401
                   TEST_DIE_ENV, preflight, run)
