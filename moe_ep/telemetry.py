"""Run telemetry: wandb (offline by default, rank 0 only) and summary.json.

Deliberately small: one class the runtime calls at fixed points, so richer dashboards
can be added here without touching the runner.
"""
from __future__ import annotations

import os
import warnings
from typing import Optional

from .config import Config
from .images import write_json_atomic
from .parallel import ParallelContext


class Telemetry:
    def __init__(self, cfg: Config, ctx: ParallelContext, out_dir: str):
        self.cfg, self.ctx, self.out_dir = cfg, ctx, out_dir
        self.run = None
        t = cfg.telemetry
        if ctx.is_main and t.wandb and t.wandb_mode != "disabled":
            os.environ.setdefault("WANDB_SILENT", "true")
            try:
                import wandb

                self.run = wandb.init(mode=t.wandb_mode, dir=out_dir, project=t.project, name=t.run_name,
                                      tags=list(t.tags) or None, config=cfg.to_dict())
            except Exception as err:  # telemetry never stops a run
                warnings.warn(f"wandb disabled: {err}")
                self.run = None

    def log_step(self, data: dict) -> None:
        if self.run is not None:
            self.run.log({k: v for k, v in data.items() if isinstance(v, (int, float))})

    def log_rebalance(self, event: dict) -> None:
        if self.run is not None:
            self.run.log({f"rebalance/{k}": v for k, v in event.items() if isinstance(v, (int, float))})

    def log_images(self, paths: list[str], captions: list[str]) -> None:
        if self.run is not None and self.cfg.telemetry.log_images and paths:
            import wandb

            self.run.log({"images": [wandb.Image(p, caption=c) for p, c in zip(paths, captions)]})

    def finish(self, summary: dict) -> Optional[str]:
        """Write summary.json (rank 0, atomically) and close the wandb run; returns the path."""
        if not self.ctx.is_main:
            return None
        path = os.path.join(self.out_dir, "summary.json")
        write_json_atomic(summary, path)
        if self.run is not None:
            self.run.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float))})
            self.run.finish()
            self.run = None
        return path
