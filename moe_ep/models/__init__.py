"""Model families behind one interface (moe_ep/models/base.py), chosen by `model.type`:

    "moe_dit"    the built-in MoE-DiT (moe_ep/models/moedit/)
    "diffusers"  a diffusers MoE transformer read from the folder `model.path`
                 (moe_ep/models/diffusers/: `build_served_model(cfg, ctx)`, `preflight(cfg, world_size)`)

The job calls only `preflight_model` (before any process group) and `build_served_model`
(every rank, collective where the model needs it).
"""
from __future__ import annotations

from ..config import Config, ConfigError
from .base import MoEShape, ServedModel

MODEL_TYPES = ("moe_dit", "diffusers")


def _diffusers_family():
    """moe_ep.models.diffusers, or a ConfigError naming model.type when it is not installed."""
    try:
        from . import diffusers as family
    except ImportError as err:
        raise ConfigError("model.type", "diffusers",
                          f"the diffusers model family (moe_ep.models.diffusers) cannot be imported ({err})") from None
    for name in ("build_served_model", "preflight"):
        if not callable(getattr(family, name, None)):
            raise ConfigError("model.type", "diffusers",
                              f"moe_ep.models.diffusers has no function '{name}' (it is not complete yet)")
    return family


def preflight_model(cfg: Config, world_size: int):
    """The model family's checks that need no process group (raise ConfigError naming the field).
    -> MoEShape (MoE layers, experts) for the eplb file checks, or None when the family cannot
    tell before it is built."""
    if cfg.model.type == "moe_dit":
        from .moedit import preflight

        return preflight(cfg, world_size)
    if cfg.model.type == "diffusers":
        return _diffusers_family().preflight(cfg, world_size)
    raise ConfigError("model.type", cfg.model.type, "must be one of " + ", ".join(repr(t) for t in MODEL_TYPES))


def build_served_model(cfg: Config, ctx) -> ServedModel:
    """The served model of this rank (weights loaded, this rank's expert slots filled)."""
    if cfg.model.type == "moe_dit":
        from .moedit import MoEDiTModel

        return MoEDiTModel.build(cfg, ctx)
    if cfg.model.type == "diffusers":
        return _diffusers_family().build_served_model(cfg, ctx)
    raise ConfigError("model.type", cfg.model.type, "must be one of " + ", ".join(repr(t) for t in MODEL_TYPES))


__all__ = ["MODEL_TYPES", "MoEShape", "ServedModel", "build_served_model", "preflight_model"]
