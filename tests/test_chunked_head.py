"""The item head in chunks of items (model/head.py, rollout/sampler.py `draw_items`): exact, and bounded in memory.

Every test compares the same tiny randomised model (conftest.py's 50-item catalog, with the intent prior so the
(B, N) prior offset is chunked too) at `model.item_chunk` = 16384 (one span: the one-piece computation) and at
small chunks (7, 1: many spans, one smaller than k): log-probs and gradients equal within float rounding, greedy
lists identical, top-k identical. Seeded sampling at T > 0 draws its Gumbel noise span by span, so its picks differ
from the one-piece draw's; there the returned log-probs are checked exactly (against the one-piece trajectory
log-probs) and the draw's distribution against the exact softmax. The last test (slow: a 1e6-item model, about
2 GB) samples with D = 128 at N = 1e6 and bounds the sampler's peak memory.
Run: `python -m pytest tests/test_chunked_head.py -q`.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import N_FEATURES, randomise
from test_model import random_requests

from catalog.batch import encode_requests
from catalog.intent import IntentIndex
from core.carriers import RequestBatch
from core.config import ModelConfig
from model.diffusion import elbo_nll, slot_log_probs, trajectory_log_probs
from model.head import item_spans, top_log_probs
from model.transformer import MASK, Retriever, allowed_items
from rollout.sampler import draw_items, sample_lists

pytestmark = pytest.mark.usefixtures("single_thread")
K = 8
ONE_PIECE = 16384
ATOL = 5e-5  # this randomised model's logits reach 100, where a float32 ulp is 8e-6: a few ulp of summation order


def chunked(model: Retriever, chunk: int) -> Retriever:
    """`model` with model.item_chunk = chunk (same weights: the config is read per call)."""
    model.cfg = dataclasses.replace(model.cfg, item_chunk=chunk)
    return model


@pytest.fixture
def model(tiny_catalog, tiny_vocab) -> Retriever:
    """A randomised 2-layer D=32 Retriever with the intent prior (intent_scale 1)."""
    generator = torch.Generator().manual_seed(3000)
    features = torch.randn(tiny_catalog.n_items, N_FEATURES, generator=generator)
    index = IntentIndex(tiny_catalog)
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=2, dropout=0.0, id_dropout=0.0, prior="ease+intent")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        out = Retriever(cfg, features, len(tiny_vocab), None, torch.from_numpy(index.values),
                        torch.from_numpy(index.parts))
    return randomise(out, 0)


@pytest.fixture(scope="module")
def batch(tiny_catalog, tiny_vocab):
    return encode_requests(tiny_catalog, random_requests(tiny_catalog, 40, K, seed=4), tiny_vocab)


def test_item_spans_cover_in_order():
    assert item_spans(50, 16384) == [(0, 50)]
    assert item_spans(50, 7) == [(lo, min(lo + 7, 50)) for lo in range(0, 50, 7)]
    assert item_spans(14, 7) == [(0, 7), (7, 14)]
    with pytest.raises(ValueError, match="item_chunk"):
        item_spans(5, 0)


@pytest.mark.parametrize("chunk", [7, 1, 50])
def test_chunked_log_probs_and_gradients_equal(model, batch, chunk):
    """ELBO terms (random mask) and their gradients with respect to every parameter: chunked = one piece. Chunks of
    7 and 1 leave some rows with no allowed item in a span (seeds, constraints): their gradients stay finite."""
    model.train()  # dropout is 0: train mode only switches gradients on as training does
    x0 = sample_lists(model, batch, K, 2, 1.0, torch.Generator().manual_seed(2)).items  # K valid items per row
    t, u = torch.full((len(batch),), 0.6), torch.rand(x0.shape, generator=torch.Generator().manual_seed(1))
    results = []
    for size in (ONE_PIECE, chunk):
        model.zero_grad()
        nll = elbo_nll(chunked(model, size), model.encode(batch), x0, t, u)
        nll.sum().backward()
        results.append((nll.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (nll_one, grads_one), (nll_chunk, grads_chunk) = results
    assert (nll_one > 0).any() and torch.isfinite(nll_one).all()
    torch.testing.assert_close(nll_chunk, nll_one, atol=ATOL, rtol=1e-6)
    assert grads_chunk.keys() == grads_one.keys() and "intent_scale" in grads_one and "item_bias" in grads_one
    for name, grad in grads_one.items():  # float32 rounding of sums over 40 x 8 slots: relative to the largest
        assert (grads_chunk[name] - grad).abs().max() <= 1e-5 * grad.abs().max() + 1e-6, name


def test_not_allowed_target_is_minus_infinity(model, batch):
    """A target the state already holds (committed elsewhere) has log-prob -inf, chunked as in one piece."""
    ctx = model.encode(batch)
    state = torch.full((len(batch), K), MASK)
    state[:, 0] = batch.valid.float().argmax(1)  # each row commits one of its valid items in slot 0
    targets = state[:, :1].expand(-1, K)  # every slot asks for the committed item
    select = state == MASK
    for size in (ONE_PIECE, 7):
        with torch.no_grad():
            out = slot_log_probs(chunked(model, size), ctx, state, targets, select)
        assert torch.isinf(out[select]).all() and (out[select] < 0).all()


@pytest.mark.parametrize("chunk", [7, 3])
def test_greedy_lists_identical(model, batch, chunk):
    """T = 0: identical lists and commit steps; the behaviour log-probs equal within rounding."""
    one = sample_lists(chunked(model, ONE_PIECE), batch, K, 3, 0.0)
    many = sample_lists(chunked(model, chunk), batch, K, 3, 0.0)
    assert torch.equal(many.items, one.items) and torch.equal(many.step_of, one.step_of)
    torch.testing.assert_close(many.logp, one.logp, atol=ATOL, rtol=0)


def test_sampled_log_probs_are_the_exact_trajectory_log_probs(model, batch):
    """T = 1 with chunks: the returned log-probs are the one-piece model's trajectory log-probs of the lists drawn."""
    out = sample_lists(chunked(model, 7), batch, K, 4, 1.0, torch.Generator().manual_seed(3))
    with torch.no_grad():
        exact = trajectory_log_probs(chunked(model, ONE_PIECE), model.encode(batch), out.items, out.step_of)
    torch.testing.assert_close(out.logp, exact, atol=ATOL, rtol=0)
    for row, items in enumerate(out.items.tolist()):
        assert len(set(items)) == K and all(batch.valid[row, i] for i in items)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_chunked_draw_follows_the_softmax(model, batch, temperature):
    """4,000 draws of one open slot (first request, all slots masked): the frequencies of the chunked Gumbel-max
    draw match softmax(logits / T) (total variation < 0.05; sampling noise alone gives about 0.03), and each
    draw's log-prob is the exact T = 1 log-prob of its pick."""
    n = 4000
    ctx = model.encode(batch)
    with torch.no_grad():
        hidden = model.hidden(ctx, torch.full((len(batch), K), MASK))[0, 0].expand(n, -1)
        rows = torch.zeros(n, dtype=torch.long)
        logits = model.allowed_logits(ctx, hidden[:1], rows[:1], batch.valid)[0]
    pick, logp = draw_items(chunked(model, 7), ctx, hidden, rows, batch.valid, temperature,
                            torch.Generator().manual_seed(11))
    exact = torch.log_softmax(logits, -1)
    torch.testing.assert_close(logp, exact[pick], atol=ATOL, rtol=0)
    freq = torch.bincount(pick, minlength=logits.numel()).double() / n
    assert 0.5 * (freq - torch.softmax(logits.double() / temperature, -1)).abs().sum() < 0.05


def test_non_finite_logits_take_the_bounded_path_in_chunks(model, batch):
    """A NaN item bias (every row's logit of item 5 is NaN): chunked and one-piece greedy lists stay identical."""
    with torch.no_grad():
        model.item_bias[5] = float("nan")
    one = sample_lists(chunked(model, ONE_PIECE), batch, K, 3, 0.0)
    many = sample_lists(chunked(model, 7), batch, K, 3, 0.0)
    assert torch.equal(many.items, one.items) and torch.isfinite(many.logp).all()


@pytest.mark.parametrize("chunk", [7, 3, 16384])
def test_top_log_probs_equal_the_full_sort(model, batch, chunk):
    """Chunked top-10 (wider than a chunk of 7 or 3) = the first 10 of the one-piece log-softmax sorted (the
    allowed ones: some requests allow fewer than 10 items)."""
    ctx = model.encode(batch)
    state = torch.full((len(batch), K), MASK)
    state[:, 0] = batch.valid.float().argmax(1)
    allowed = allowed_items(batch.valid, state)
    with torch.no_grad():
        hidden = model.hidden(ctx, state)[:, 1]  # (B, D)
        rows = torch.arange(len(batch))
        full = torch.log_softmax(model.allowed_logits(ctx, hidden, rows, allowed), -1).sort(-1, descending=True)
        logp, items = top_log_probs(chunked(model, chunk), ctx, hidden, rows, allowed, 10)
    torch.testing.assert_close(logp, full.values[:, :10], atol=ATOL, rtol=0)
    finite = torch.isfinite(logp)  # a request allowing fewer than 10 items ends in -inf ties, in either order
    assert not finite.all() and torch.equal(items[finite], full.indices[:, :10][finite])
    with pytest.raises(ValueError, match="k must be"):
        top_log_probs(model, ctx, hidden, rows, allowed, 51)


def peak_rss_since_reset() -> int:
    """Bytes of the process's peak resident set since the last `reset_peak_rss` (Linux VmHWM)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # resets VmHWM to the current resident set (Linux >= 4.0)


@pytest.mark.slow
def test_sampler_memory_at_a_million_items():
    """N = 1e6 random items, D = 128, 4 requests, k = 20, S = 3, T = 1: the sampler's peak resident memory over its
    starting point stays under 128 MiB (measured 49 MiB at the default item_chunk; in one piece about 900 MiB: the
    (M, N) logits, Gumbel noise and mask of M = 80 open slots). The item embeddings are computed beforehand
    (`freeze_items`, as in serving) and a one-step warm-up call takes the process's one-time allocations."""
    n, b, k = 1_000_000, 4, 20
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=128, n_layers=1, n_heads=4, dropout=0.0, id_dropout=0.0, prior="none")
    model = Retriever(cfg, torch.randn(n, 8), n_values=4)
    model.freeze_items()
    generator = torch.Generator().manual_seed(0)
    seeds = torch.randint(0, n, (b, 3), generator=generator)
    valid = torch.rand(b, n, generator=generator) < 0.5
    valid[torch.arange(b)[:, None], seeds] = False
    zeros = torch.zeros((b, 1), dtype=torch.long)
    batch = RequestBatch(seeds, torch.ones_like(seeds, dtype=torch.bool), zeros, zeros.bool(), zeros, zeros,
                         zeros.float(), zeros.bool(), valid)
    sample_lists(model, batch, 2, 1, 1.0, generator)  # warm-up
    reset_peak_rss()
    start = peak_rss_since_reset()
    out = sample_lists(model, batch, k, 3, 1.0, generator)
    grown = peak_rss_since_reset() - start
    print(f"sampler peak memory over its start at N = 1e6, D = 128, {b} requests, k = {k}: {grown / 2**20:.0f} MiB")
    assert grown < 128 * 2**20
    for row, items in enumerate(out.items.tolist()):
        assert len(set(items)) == k and bool(valid[row, items].all())
    assert np.isfinite(out.logp.numpy()).all()
