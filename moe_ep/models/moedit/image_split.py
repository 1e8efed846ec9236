"""How one image's transformer forward is split over its cfg x sp ranks (docs/parallelism.md).

All ranks of one (cfg x sp) group hold the same batch, latents and prompts. At the transformer
boundary:

    [cond; uncond] batch of 2B samples --cfg rank i takes chunk i--> B samples (its branch)
    tokens [b, N, H] --sp rank j takes tokens [j*N/sp, (j+1)*N/sp)--> [b, N/sp, H]
    ... blocks: self-attention over the sharded sequence (Ulysses / ring / USP), cross-attention
        to the replicated text locally, MoE layers route their own shard ...
    [b, N/sp, p*p*C] --all-gather over sp--> [b, N, p*p*C] --unpatchify--> [b, C, h, w]
    --all-gather over cfg along the batch--> [2B, C, h, w] on every rank of the group

so the sampler is unchanged and every rank of the group keeps identical latents. The ranks of a
group always hold the same batch size, so a batch with no samples (a rank with no prompts left)
skips the cfg/sp collectives on every rank of the group alike; the MoE layers still take part in
the EP all-to-alls.

`forward_info` describes the MoE input rows THIS rank routes (its branch chunk, its token shard),
which is what the expert-load statistics count: summed over the world, every token of every
branch counts once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as tdist
import torch.nn.functional as F

from ...parallel_layout import ParallelLayout
from ...sequence_parallel import sequence_parallel_attention, shard_sequence, unshard_sequence
from ..base import ForwardInfo


@dataclass(frozen=True)
class ImageSplit:
    """The cfg chunk and sp token shard of this rank (`layout` of its ParallelContext)."""

    layout: ParallelLayout

    @property
    def parallel(self) -> bool:
        """True when one image's forward spans several ranks (cfg or sp > 1)."""
        return self.layout.cfg > 1 or self.layout.sp > 1

    # ------------------------------------------------------------ cfg: the batch
    def branch_slice(self, batch: int) -> slice:
        """This cfg rank's contiguous chunk of a transformer batch of `batch` samples."""
        c = self.layout.cfg
        if batch % c:
            raise ValueError(f"a transformer batch of {batch} samples does not split over cfg_parallel_size {c} "
                             f"(it is [conditional; unconditional])")
        n = batch // c
        i = self.layout.index("cfg")
        return slice(i * n, (i + 1) * n)

    def split_batch(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """This cfg rank's chunk of each tensor's batch (dim 0)."""
        if self.layout.cfg == 1:
            return xs
        sl = self.branch_slice(xs[0].shape[0])
        return tuple(x[sl] for x in xs)

    @torch.compiler.disable
    def join_batch(self, x: torch.Tensor) -> torch.Tensor:
        """[b, ...] per cfg rank -> [cfg*b, ...] (chunks in cfg-rank order) on every cfg rank."""
        if self.layout.cfg == 1 or x.shape[0] == 0:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.layout.cfg)]
        tdist.all_gather(parts, x, group=self.layout.group("cfg"))
        return torch.cat(parts, dim=0)

    # ------------------------------------------------------------ sp: the tokens
    def shard_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """[b, N, C] -> this sp rank's [b, N/sp, C] (shard layout.index("sp"))."""
        return x if self.layout.sp == 1 else shard_sequence(x, self.layout, dim=1)

    @torch.compiler.disable
    def unshard_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """[b, N/sp, C] per sp rank -> [b, N, C] (all-gather in sp-rank order)."""
        if self.layout.sp == 1:
            return x
        if x.shape[0] == 0:
            return x.new_empty(0, x.shape[1] * self.layout.sp, *x.shape[2:])
        return unshard_sequence(x, self.layout, dim=1)

    @torch.compiler.disable
    def self_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q/k/v [b, heads, N/sp, d] of this rank's shard -> attention over the whole image's
        tokens, for this shard's queries [b, heads, N/sp, d]."""
        if self.layout.sp == 1 or q.shape[0] == 0:
            return F.scaled_dot_product_attention(q, k, v)
        return sequence_parallel_attention(q, k, v, self.layout)[0]

    # ------------------------------------------------------------ statistics
    def forward_info(self, batch: int, tokens_per_image: int, guidance: bool) -> ForwardInfo:
        """The ForwardInfo of this rank's MoE input rows for a batch of `batch` prompts: the
        sampler's transformer batch is [cond; uncond] (2*batch samples) with guidance, else
        `batch` samples; this rank routes its cfg chunk of it, tokens_per_image / sp rows each."""
        branches: Optional[list[int]] = [0] * batch + [1] * batch if guidance else None
        samples = 2 * batch if guidance else batch
        local = list(range(samples))[self.branch_slice(samples)]
        rows_per_sample = tokens_per_image // self.layout.sp
        info: ForwardInfo = {"batch": batch, "rows": len(local) * rows_per_sample,
                             "cond_rows": None, "sample_branch": None}
        if branches is not None:
            mine = [branches[s] for s in local]
            info["sample_branch"] = mine
            info["cond_rows"] = mine.count(0) * rows_per_sample   # conditional rows come first locally too
        return info
