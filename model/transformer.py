"""The masked-diffusion transformer over k list slots (DESIGN section 3).

Sequence: [constraint tokens] [negative tokens] [seed tokens] [slot_1 .. slot_k], full bidirectional attention.
Seeds and negatives get the item embedding plus a segment embedding and no position (a set); slots get a
learned rank position plus either [MASK] or the embedding of the committed item. Pre-LN blocks are conditioned
with adaLN-Zero (Peebles & Xie, arXiv:2212.09748) on a pooled request vector; absorbing-state diffusion needs
no time input (RADD, arXiv:2406.03736), which stays an option. Items are atomic ids with a tied, factorised
embedding E_i = LayerNorm(W_f x_i) + u_i (u_i starts at zero), used for seeds, committed slots and the head:
logit_k(i) = <W_o h_k, E_i> + b_i (+ prior_i when a prior is configured: the model then scores a residual over a
strong prior). The prior is prior_scale * (EASE's scores of the seeds, standardised over the valid items; B kept
as each item's top-m neighbours, model.prior_neighbours, so memory is N x m, not N x N) and, with
`model.prior=ease+intent`, + sum_v intent_scale[part(v)] * [all seeds have value v] * [item i has v]: the intent read
off the seeds (catalog/intent.py; one learned scale per attribute field and one for the decade; with
`model.intent_gate`, each scale times 2 sigmoid(g_p . c), c the pooled request vector and g_p starting at zero, so that
a request can trust its shared values more or less than another). The softmax is exact
over all N items, computed in spans of model.item_chunk items (model/head.py).

Shapes: B requests, K slots, N items, D width, L tokens. A slot value of -1 means [MASK].
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from core.carriers import CONSTRAINT_KINDS, RequestBatch
from core.config import ModelConfig
from core.numerics import Neighbours, intent_counts, masked_zscore, seed_row_sum, shared_values

MASK = -1
SEGMENTS = {"constraint": 0, "negative": 1, "seed": 2, "slot": 3}


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x * (1 + scale) + shift, conditioning broadcast over tokens."""
    return x * (1 + scale[:, None]) + shift[:, None]


class Block(nn.Module):
    """Pre-LN transformer block with adaLN-Zero modulation (gates start at zero: the block starts as identity)."""

    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * d, d))
        self.ada = nn.Linear(d, 6 * d)
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """x (B, L, D), cond (B, D), keep (B, L) bool: tokens that may be attended to."""
        b, length, d = x.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(cond).chunk(6, dim=-1)
        q, k, v = self.qkv(modulate(self.norm1(x), shift1, scale1)).view(b, length, 3, self.heads, -1).unbind(2)
        attn = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              attn_mask=keep[:, None, None, :],
                                              dropout_p=self.dropout if self.training else 0.0)
        x = x + gate1[:, None] * self.proj(attn.transpose(1, 2).reshape(b, length, d))
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


@dataclass
class Context:
    """Per-batch quantities the sampler reuses across denoising steps."""

    items: torch.Tensor  # (N, D) item embeddings E
    tokens: torch.Tensor  # (B, L0, D) constraint + negative + seed tokens
    keep: torch.Tensor  # (B, L0) bool
    cond: torch.Tensor  # (B, D) pooled request vector
    prior: torch.Tensor | None  # (B, N) prior logits: scaled standardised EASE scores (+ scaled intent counts)
    valid: torch.Tensor  # (B, N) bool


class Retriever(nn.Module):
    """Seed-set-conditioned masked-diffusion transformer with a tied item head."""

    def __init__(self, cfg: ModelConfig, features: torch.Tensor, n_values: int,
                 prior: Neighbours | None = None, intent_values: torch.Tensor | None = None,
                 intent_parts: torch.Tensor | None = None):
        super().__init__()
        n, f = features.shape
        d = cfg.d_model
        self.cfg = cfg
        self.register_buffer("features", features.float())  # (N, F) item features x_i
        self.feature_proj = nn.Linear(f, d)  # W_f
        self.feature_norm = nn.LayerNorm(d)
        self.item_residual = nn.Parameter(torch.zeros(n, d))  # u_i
        self.item_bias = nn.Parameter(torch.zeros(n))  # b_i
        self.segment = nn.Embedding(len(SEGMENTS), d)
        self.rank = nn.Embedding(cfg.max_k, d)
        self.mask_embedding = nn.Parameter(torch.randn(d) * 0.02)
        self.con_kind = nn.Embedding(len(CONSTRAINT_KINDS), d)
        self.con_value = nn.Embedding(n_values + 1, d)
        self.con_scalar = nn.Linear(1, d)
        self.cond = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.time = nn.Sequential(nn.Linear(1, d), nn.SiLU(), nn.Linear(d, d)) if cfg.time_input else None
        self.blocks = nn.ModuleList(Block(d, cfg.n_heads, cfg.dropout) for _ in range(cfg.n_layers))
        self.final_norm = nn.LayerNorm(d, elementwise_affine=False)
        self.final_ada = nn.Linear(d, 2 * d)
        nn.init.zeros_(self.final_ada.weight)
        nn.init.zeros_(self.final_ada.bias)
        self.head = nn.Linear(d, d, bias=False)  # W_o
        self.frozen_items: torch.Tensor | None = None  # E for serving (`freeze_items`); None = computed per call
        if cfg.zero_head:  # logits start as b_i + prior_i (b_i = 0): the residual starts at zero, not at noise
            nn.init.zeros_(self.head.weight)
        if prior is not None and not isinstance(prior, Neighbours):
            raise TypeError(f"the prior is a core.numerics.Neighbours (sparse top-m rows), not {type(prior).__name__}")
        if prior is not None:  # EASE's B as each item's top-m neighbours: prior(seeds) = sum of its seed rows
            self.register_buffer("prior_indices", prior.indices)  # (N, m) int
            self.register_buffer("prior_values", prior.values)  # (N, m) float16
            self.prior_scale = nn.Parameter(torch.tensor(1.0))
        else:
            self.prior_indices = self.prior_values = None
        if intent_values is not None:  # catalog.intent.IntentIndex's multi-hot and the part of each column
            self.register_buffer("intent_values", intent_values.bool())  # (N, V)
            self.register_buffer("intent_parts", intent_parts.long())  # (V,)
            parts = int(intent_parts.max()) + 1 if intent_parts.numel() else 0
            self.intent_scale = nn.Parameter(torch.full((parts,), float(cfg.intent_init)))  # (P,)
        else:
            self.intent_values = None
        self.intent_gate = nn.Linear(d, parts) if cfg.intent_gate and intent_values is not None else None
        if self.intent_gate is not None:  # starts at a gate of 1 for every request: the ungated prior
            nn.init.zeros_(self.intent_gate.weight)
            nn.init.zeros_(self.intent_gate.bias)

    @property
    def device(self) -> torch.device:
        """Where the parameters live; callers move request tensors here."""
        return self.item_bias.device

    def item_embeddings(self) -> torch.Tensor:
        """E = LayerNorm(W_f x) + u, with id dropout on u in training.  # (N, D)
        A model frozen for serving (`freeze_items`) returns the E it computed then."""
        if self.frozen_items is not None:
            return self.frozen_items
        u = self.item_residual
        if self.training and self.cfg.id_dropout > 0:
            u = u * (torch.rand(u.shape[0], 1, device=u.device) >= self.cfg.id_dropout)
        return self.feature_norm(self.feature_proj(self.features)) + u

    def freeze_items(self) -> None:
        """Serving: compute E once per loaded checkpoint instead of once per batch (its weights no longer change; at
        small batches E is a large share of each call: 2 N F D FLOPs, with MovieLens's F = 163 as many as 8 steps of
        one request's item head at k = 20). The values are the same; the model stays in eval mode from here on."""
        self.eval()
        with torch.inference_mode():
            self.frozen_items = self.item_embeddings()

    @property
    def prior(self) -> Neighbours | None:
        """The sparse EASE prior (each item's top-m neighbours), or None."""
        return None if self.prior_indices is None else Neighbours(self.prior_indices, self.prior_values)

    def prior_scores(self, batch: RequestBatch) -> torch.Tensor | None:
        """(B, N) prior logits of the seed set: prior_scale * EASE's scores standardised per request over its valid
        items, + the intent counts weighted by intent_scale per part (and the request's gate, model.intent_gate) when
        the model has an intent prior. EASE's scores are the batch's own when it carries them (`batch.ease`: an
        out-of-fold EASE for training requests, model.prior_folds), else the seeds' rows of the model's EASE."""
        return self.encode(batch).prior

    def _prior_scores(self, batch: RequestBatch, cond: torch.Tensor) -> torch.Tensor | None:
        if self.prior_indices is None and self.intent_values is None:
            return None
        if batch.ease is not None and self.prior_indices is None:
            raise ValueError("the batch carries EASE scores (batch.ease) but the model has no EASE prior")
        with torch.autocast(device_type=batch.valid.device.type, enabled=False):  # fp32, as the logits
            prior = torch.zeros(batch.valid.shape, device=batch.valid.device)
            if self.prior_indices is not None:
                raw = batch.ease if batch.ease is not None else seed_row_sum(self.prior, batch.seeds, batch.seed_mask)
                prior = self.prior_scale * masked_zscore(raw, batch.valid)
            if self.intent_values is not None:
                shared = shared_values(self.intent_values, batch.seeds, batch.seed_mask)  # (B, V)
                weights = self.intent_scale  # (P,)
                if self.intent_gate is not None:
                    weights = weights * 2 * torch.sigmoid(self.intent_gate(cond.float()))  # (B, P)
                prior = prior + intent_counts(self.intent_values, shared, weights[..., self.intent_parts])
            return prior

    def encode(self, batch: RequestBatch) -> Context:
        """Embed the request part of the sequence once per batch (its prior: `prior_scores`)."""
        items = self.item_embeddings()
        seg = self.segment.weight
        cons = (self.con_kind(batch.con_kind) + self.con_value(batch.con_value)
                + self.con_scalar(batch.con_scalar[..., None]) + seg[SEGMENTS["constraint"]])
        negs = items[batch.negatives] + seg[SEGMENTS["negative"]]
        seeds = items[batch.seeds] + seg[SEGMENTS["seed"]]
        tokens = torch.cat([cons, negs, seeds], dim=1)  # (B, L0, D)
        keep = torch.cat([batch.con_mask, batch.negative_mask, batch.seed_mask], dim=1)
        pooled = (tokens * keep[..., None]).sum(1) / keep.sum(1, keepdim=True).clamp_min(1)
        cond = self.cond(pooled)
        return Context(items, tokens, keep, cond, self._prior_scores(batch, cond), batch.valid)

    def hidden(self, ctx: Context, slots: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        """Slot outputs after the blocks, projected by W_o.  slots (B, K) long with MASK=-1 -> (B, K, D)"""
        b, k = slots.shape
        masked = slots == MASK
        slot_items = ctx.items[slots.clamp_min(0)]  # (B, K, D)
        content = torch.where(masked[..., None], self.mask_embedding, slot_items)
        slot_tokens = content + self.rank.weight[:k] + self.segment.weight[SEGMENTS["slot"]]
        x = torch.cat([ctx.tokens, slot_tokens], dim=1)
        keep = torch.cat([ctx.keep, torch.ones_like(masked)], dim=1)
        cond = ctx.cond
        if self.time is not None:
            cond = cond + self.time((t if t is not None else torch.ones(b, device=slots.device))[:, None])
        for block in self.blocks:
            x = block(x, cond, keep)
        shift, scale = self.final_ada(cond).chunk(2, dim=-1)
        h = modulate(self.final_norm(x[:, -k:]), shift, scale)
        return self.head(h)

    def logits(self, ctx: Context, hidden: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Item logits: hidden (B, K, D) -> (B, K, N), or selected slot outputs hidden (M, D) of requests rows (M,)
        -> (M, N). Always fp32 (outside any bf16 autocast): log-probs feed PPO ratios and DPO margins."""
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            out = hidden.float() @ ctx.items.T.float() + self.item_bias
            if ctx.prior is not None:
                out = out + (ctx.prior[:, None] if rows is None else ctx.prior[rows])
        return out


    def item_logits(self, ctx: Context, hidden: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """The entries of `logits` at given items only: hidden (B, D) of one slot per request, items (B, K) -> (B, K)
        fp32, without forming (B, N)."""
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            out = torch.einsum("bd,bkd->bk", hidden.float(), ctx.items[items].float()) + self.item_bias[items]
            if ctx.prior is not None:
                out = out + ctx.prior.gather(1, items)
        return out

    def allowed_logits(self, ctx: Context, hidden: torch.Tensor, rows: torch.Tensor,
                       allowed: torch.Tensor, span: tuple[int, int] | None = None) -> torch.Tensor:
        """`logits(ctx, hidden, rows)` with -inf where `allowed` (B, N) is False -> (M, N), or only items
        lo <= i < hi of `span` = (lo, hi) -> (M, hi - lo) (model/head.py's chunks).

        Same values as `logits(...).masked_fill(~allowed[rows], -inf)`, in fewer passes over (M, N): bias, prior
        and mask are folded into one (B, N) offset per request, gathered once, and the matmul accumulates into it.
        """
        lo, hi = span if span is not None else (0, allowed.shape[1])
        prior = None if ctx.prior is None else ctx.prior[:, lo:hi]
        return masked_logits(hidden, rows, allowed[:, lo:hi], ctx.items[lo:hi], self.item_bias[lo:hi], prior)


def masked_logits(hidden: torch.Tensor, rows: torch.Tensor, allowed: torch.Tensor, items: torch.Tensor,
                  bias: torch.Tensor, prior: torch.Tensor | None) -> torch.Tensor:
    """`Retriever.allowed_logits` on given item columns: hidden (M, D), rows (M,), allowed (B, n) bool, items (n, D),
    bias (n,), prior (B, n) or None -> (M, n) fp32, -inf where not allowed."""
    with torch.autocast(device_type=hidden.device.type, enabled=False):  # fp32, as `logits`
        offset = bias.expand(allowed.shape[0], -1)
        if prior is not None:
            offset = offset + prior
        offset = torch.where(allowed, offset, torch.tensor(float("-inf"), device=offset.device))
        return offset[rows].addmm_(hidden.float(), items.T.float())


def precision(model: Retriever, bf16: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast for the model's forward passes when it is on a GPU and `bf16` is set; fp32 otherwise.
    Weights (and the optimiser) stay fp32; the item head and every log-softmax run in fp32."""
    if bf16 and model.device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def allowed_items(valid: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """(B, N) bool: valid items not yet committed to a slot (DESIGN 3.3)."""
    committed = torch.zeros_like(valid)
    rows, cols = (slots >= 0).nonzero(as_tuple=True)
    committed[rows, slots[rows, cols]] = True
    return valid & ~committed


def masked_log_softmax(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """log p over the allowed set only: the model's distribution by definition (DESIGN 3.3)."""
    return torch.log_softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
