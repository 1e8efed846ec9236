"""The parallel layout: which rank does what, and the process group of every axis.

    world = dp x cfg x sp,  sp = ring x ulysses

    rank = ((dp_i * cfg + cfg_i) * ring + ring_i) * ulysses + ulysses_i

Ulysses is innermost, so its all-to-all (the heaviest traffic of sequence parallelism) stays
on consecutive ranks, i.e. on one node when it fits; ring steps, then the guidance branches
(cfg), then the prompt-splitting data-parallel axis (dp) lie further out. Tensor parallelism,
if it is ever implemented, goes innermost of all (docs/parallelism.md).

Expert parallelism is laid over the same ranks independently: EP group d is the `ep`
consecutive ranks [d*ep, (d+1)*ep), which may span any of the axes above, and the ranks with
the same EP rank form an "ep_replica" group (what ParallelContext.dp_group has always been:
the replicas that sum their expert-load statistics).

`ParallelLayout` is the only place that turns sizes into ranks: every part asks it for its
group (`layout.group("ulysses")`) or its members (`layout.members("ring")`); nothing else
derives ranks. A layout made by hand (tests, a world of one) has the arithmetic but no process
groups; `with_process_groups` creates them.

Why not a torch DeviceMesh: the EP group of `ep` consecutive ranks is in general not a mesh
dimension (EP 2 inside a Ulysses axis of 4 is half of one), the groups must take the run's
`parallel.timeout_s` (new_group(timeout=...)) so no collective hangs, and the rank arithmetic
must be testable without any process group. A library that needs a mesh (diffusers' context
parallelism) can be given one built from `members(...)` later.
"""
from __future__ import annotations

import dataclasses
import datetime
from dataclasses import dataclass, field
from typing import Any, Mapping, NamedTuple, Optional

import torch.distributed as tdist

# Every axis a part may ask for. "sp" is ring x ulysses together (one image's token shards).
AXES = ("dp", "cfg", "sp", "ring", "ulysses", "ep", "ep_replica")


class RankCoords(NamedTuple):
    """A rank's index along each layout axis."""

    dp: int
    cfg: int
    ring: int
    ulysses: int


@dataclass(frozen=True)
class ParallelLayout:
    """Sizes of the axes, this process's rank, and (optionally) its process groups."""

    world_size: int = 1
    dp: int = 1
    cfg: int = 1
    ring: int = 1
    ulysses: int = 1
    ep: int = 1
    rank: int = 0
    # axis -> this rank's process group of that axis (None where the axis has one rank);
    # empty for a layout without process groups
    process_groups: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)
    # the config key(s) that set sp, as the user gave them (config.sequence_parallel_field): an
    # error about the sp size names what the user wrote, not a key they never set
    sp_field: str = field(default="parallel.sequence_parallel_size", compare=False, repr=False)

    def __post_init__(self):
        if self.dp * self.cfg * self.ring * self.ulysses != self.world_size:
            raise ValueError(f"dp x cfg x ring x ulysses = {self.dp} x {self.cfg} x {self.ring} x {self.ulysses} "
                             f"is not the world size {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside a world of {self.world_size}")

    @classmethod
    def data_parallel(cls, world_size: int = 1, rank: int = 0, ep: int = 1) -> "ParallelLayout":
        """Every rank its own prompt-splitting rank: the layout of a run without sp or cfg."""
        return cls(world_size=world_size, dp=world_size, ep=ep, rank=rank)

    @property
    def sp(self) -> int:
        return self.ring * self.ulysses

    def sp_key(self) -> tuple[str, int]:
        """(sp_field, the value it has in this layout): what an error about the sp size names."""
        return self.sp_field, {"parallel.ulysses_degree": self.ulysses, "parallel.ring_degree": self.ring}.get(
            self.sp_field, self.sp)

    # ---------------------------------------------------------------- rank arithmetic

    def rank_at(self, dp: int = 0, cfg: int = 0, ring: int = 0, ulysses: int = 0) -> int:
        return ((dp * self.cfg + cfg) * self.ring + ring) * self.ulysses + ulysses

    def coords(self, rank: Optional[int] = None) -> RankCoords:
        r = self.rank if rank is None else rank
        r, ulysses = divmod(r, self.ulysses)
        r, ring = divmod(r, self.ring)
        dp, cfg = divmod(r, self.cfg)
        return RankCoords(dp, cfg, ring, ulysses)

    def size(self, axis: str) -> int:
        _check_axis(axis)
        if axis == "ep_replica":
            return self.world_size // self.ep
        return getattr(self, axis)

    def groups(self, axis: str) -> tuple[tuple[int, ...], ...]:
        """Every group of `axis`, each as its global ranks in group-rank order (ascending)."""
        _check_axis(axis)
        if axis in ("ep", "ep_replica"):
            if self.world_size % self.ep:
                raise ValueError(f"EP size {self.ep} does not divide the world size {self.world_size}")
            if axis == "ep":
                return tuple(tuple(range(d * self.ep, (d + 1) * self.ep)) for d in range(self.world_size // self.ep))
            return tuple(tuple(range(e, self.world_size, self.ep)) for e in range(self.ep))
        out: dict[tuple, list[int]] = {}
        for r in range(self.world_size):   # ranks ascending, so each group comes out in order
            out.setdefault(self._key(axis, r), []).append(r)
        return tuple(tuple(g) for g in out.values())

    def _key(self, axis: str, rank: int) -> tuple:
        """The coordinates that stay fixed along `axis` (ranks with equal keys share a group)."""
        c = self.coords(rank)
        return {"dp": (c.cfg, c.ring, c.ulysses), "cfg": (c.dp, c.ring, c.ulysses), "sp": (c.dp, c.cfg),
                "ring": (c.dp, c.cfg, c.ulysses), "ulysses": (c.dp, c.cfg, c.ring)}[axis]

    def members(self, axis: str, rank: Optional[int] = None) -> tuple[int, ...]:
        """Global ranks of `rank`'s (default: this rank's) group of `axis`, in group-rank order."""
        r = self.rank if rank is None else rank
        return next(g for g in self.groups(axis) if r in g)

    def index(self, axis: str, rank: Optional[int] = None) -> int:
        """`rank`'s (default: this rank's) rank inside its group of `axis`. For "sp" this is
        ring_i * ulysses + ulysses_i: the index of the token shard it holds."""
        r = self.rank if rank is None else rank
        return self.members(axis, r).index(r)

    # ---------------------------------------------------------------- process groups

    def group(self, axis: str):
        """This rank's process group of `axis`; None where the axis has one rank."""
        _check_axis(axis)
        if self.size(axis) == 1:
            return None
        if axis not in self.process_groups:
            raise RuntimeError(f"this layout has no process groups (made by hand?): no '{axis}' group; "
                               f"build the context with parallel.build_context")
        return self.process_groups[axis]

    def with_process_groups(self, timeout: datetime.timedelta) -> "ParallelLayout":
        """This layout with every axis's group created. Collective over the world: every rank
        calls it with the same sizes and creates every group in the same order. Groups with the
        same members (e.g. sp and ulysses when ring = 1) share one communicator."""
        made: dict[tuple, Any] = {}
        mine: dict[str, Any] = {}
        for axis in AXES:
            for ranks in self.groups(axis):
                if len(ranks) == 1:
                    continue
                if ranks not in made:
                    made[ranks] = tdist.new_group(list(ranks), timeout=timeout)
                if self.rank in ranks:
                    mine[axis] = made[ranks]
        return dataclasses.replace(self, process_groups=mine)

    def describe(self) -> str:
        return (f"world {self.world_size} = dp {self.dp} x cfg {self.cfg} x sp {self.sp} "
                f"(ring {self.ring} x ulysses {self.ulysses}); EP {self.ep}")


def _check_axis(axis: str) -> None:
    if axis not in AXES:
        raise ValueError(f"unknown layout axis {axis!r}; axes: {', '.join(AXES)}")
