"""The batch-invariant expert path: a token's MoE output does not depend on the other rows it is
computed with (the idea of vLLM's batch-invariant mode, applied to the experts and the combine).

Why results move at all: a GEMM kernel picks its blocking, vector tails and thread split from its
shape, and the row count of an expert's GEMM depends on which tokens share it: the other prompts of
the batch, the EP size (an expert rank gathers rows from every rank), the placement (a replica splits
an expert's rows between two slots, a rebalance moves them). On this repo's CPU build (torch 2.13,
MKL) `x[:m] @ w` differs from the first m rows of `x @ w` in the last bit for m <= 3 on one thread
and for m up to 11 on two; `torch._grouped_mm` differs from one group size to the next. Three rules
make a token's output the same bit for bit in all of those cases:

1. One GEMM shape (`blocked_swiglu`): each slot's rows go through the experts in blocks of
   `BLOCK_ROWS` rows, the slot's last block zero-padded, as one `torch.bmm` over all blocks with
   each block's slot weights. Every row then goes through the same [B, H] @ [H, 2F] and
   [B, F] @ [F, H] products. Measured (tests/test_batch_invariant.py): a block's bmm result does
   not depend on the number of blocks, on the other rows of its block, or on the thread count.
2. Elementwise functions built from ops whose result does not depend on where an element sits in
   its tensor (`silu_mul`): torch's vectorised silu and sigmoid differ from their scalar tail loop
   in the last bit (for 4% of random inputs), so an element's silu would depend on the tensor's
   length; exp, +, * and / give the same bits in both loops. silu(g) = g / (1 + exp(-g)).
3. One order of addition (`ordered_combine`): each routed copy's expert output is weighted in
   float32 and rounded once to the layer's dtype, and a token's k terms are added in copy order
   j = 0..k-1 in float32 (then the shared expert's output). At EP > 1 every copy's output comes back
   on its own (one row per copy): the pair exchange's partial sums per rank would make the
   association depend on the placement once k >= 3.

The router's gate (`blocked_linear`) follows rule 1 with one weight for every block. The dense
parts of the built-in MoE-DiT (attention, adaLN, norms, embedders, the final layer, the text
encoder) run each sample alone (moe_ep/models/moedit/dit.py `per_sample`): a sample's ops then
have the same shapes and inputs whatever else is in the batch, and the ops between them over the
whole batch are elementwise + and * (correctly rounded wherever an element sits).

GPU: the Triton grouped GEMMs (kernels/grouped_gemm.py) already compute each row the same way for
any row count: one fixed tile configuration per GEMM and weight shape (kernels/gemm_configs.py),
no autotuning on M, no split-K. So on CUDA the layer keeps them (QuACK's GEMMs are switched to Triton: their tile
scheduling was not checked for this) and applies rules 3. Not measured: no GPU here.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:                 # router.py uses blocked_linear: no import cycle at run time
    from .router import RoutedCopies

# Rows per GEMM block. 16: the largest waste (15 zero rows per slot per GEMM) stays small next to a
# slot's rows in a denoising forward (about 60 per slot in the quickstart), and a [16, H] @ [H, 2F]
# product is large enough for MKL's blocked kernel (m <= 3 takes another path).
BLOCK_ROWS = 16


def resolve(mode: str, device: torch.device) -> bool:
    """model.moe.batch_invariant ("auto", "on", "off") on a rank of `device` -> on or off
    ("auto": on for CPU ranks)."""
    return mode == "on" or (mode == "auto" and device.type == "cpu")


def blocked_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ weight.T (weight [N, K], nn.Linear's layout) -> [..., N], every row in a
    [BLOCK_ROWS, K] @ [K, N] product of one torch.bmm (rule 1, one weight for all blocks;
    measured: a block's result does not depend on the number of blocks beside it)."""
    K, N = x.shape[-1], weight.shape[0]
    rows = x.reshape(-1, K)                                                    # [M, K]
    M = rows.shape[0]
    nb = -(-M // BLOCK_ROWS)
    padded = rows.new_zeros(nb * BLOCK_ROWS, K)                                # [nb*B, K]
    padded[:M] = rows
    y = torch.bmm(padded.view(nb, BLOCK_ROWS, K), weight.t().expand(nb, K, N))   # [nb, B, N]
    return y.view(nb * BLOCK_ROWS, N)[:M].view(*x.shape[:-1], N)


def silu_mul(h: torch.Tensor) -> torch.Tensor:
    """SwiGLU activation of fused [gate | up] rows, h [..., 2F] -> silu(gate) * up [..., F], from
    exp, +, / and * only (rule 2): each element's result does not depend on its position."""
    gate, up = h.chunk(2, dim=-1)
    return gate / (1.0 + torch.exp(-gate)) * up


def block_layout(counts: torch.Tensor, num_rows: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """counts [S] rows per slot (sum = num_rows) -> (dest [num_rows]: the row of the padded block
    layout each slot-grouped row goes to, block_slot [nb]: the slot of each block). One host sync."""
    S, dev = counts.numel(), counts.device
    blocks = (counts + block - 1) // block                                     # [S]
    num_blocks = int(blocks.sum())                                             # the host sync
    slot_ids = torch.arange(S, device=dev)
    block_slot = torch.repeat_interleave(slot_ids, blocks, output_size=num_blocks)    # [nb]
    row_slot = torch.repeat_interleave(slot_ids, counts, output_size=num_rows)        # [M]
    first_row = counts.cumsum(0) - counts                                      # [S]
    first_padded = (blocks.cumsum(0) - blocks) * block                         # [S]
    dest = first_padded[row_slot] + torch.arange(num_rows, device=dev) - first_row[row_slot]   # [M]
    return dest, block_slot


def blocked_swiglu(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, counts: torch.Tensor,
                   block: int = BLOCK_ROWS) -> torch.Tensor:
    """SwiGLU experts with every row in a GEMM of one shape (rule 1): x [M, H] grouped by slot
    (counts [S] rows per slot), w13 [S, H, 2F] ([gate | up]), w2 [S, F, H] -> [M, H]."""
    M, H = x.shape
    dest, block_slot = block_layout(counts, M, block)
    nb = block_slot.numel()
    padded = x.new_zeros(nb * block, H)                                        # [nb*B, H]
    padded[dest] = x
    h = torch.bmm(padded.view(nb, block, H), w13[block_slot])                  # [nb, B, 2F]
    y = torch.bmm(silu_mul(h), w2[block_slot])                                 # [nb, B, H]
    return y.view(nb * block, H)[dest]                                         # [M, H]


def ordered_combine(per_copy: torch.Tensor, copies: RoutedCopies) -> torch.Tensor:
    """Rule 3: per_copy [N, H] each routed copy's (unweighted) expert output, in copy order ->
    [T, H] in per_copy's dtype: term_c = dtype(fp32(y_c) * w_c); a token's terms added in copy
    order in float32 (token choice: copy t*k + j, j = 0..k-1; expert choice: the copies' order)."""
    T, H = copies.num_tokens, per_copy.shape[1]
    terms = (per_copy.float() * copies.weight.float().unsqueeze(1)).to(per_copy.dtype).float()   # [N, H]
    if copies.token is None:
        by_token = terms.view(T, copies.top_k, H)                              # [T, k, H]
        acc = by_token[:, 0].clone()                                           # [T, H]
        for j in range(1, copies.top_k):
            acc = acc + by_token[:, j]
        return acc.to(per_copy.dtype)
    # 0..E copies per token: added one copy after another, in copy order (index_add_ on the CPU)
    acc = torch.zeros(T, H, dtype=torch.float32, device=per_copy.device)
    return acc.index_add_(0, copies.token, terms).to(per_copy.dtype)
