"""Tests of the model's intent prior (`model.prior=ease+intent`, issue 13): the seeds' shared attribute values and
decade, weighted per part by a learned scale, added to the EASE prior of the item logits.

Tiny catalog from conftest.py (N=50; item i has genre i % 4, plus (i + 1) % 4 when i % 3 == 0; year
1950 + (7 i mod 70)); a 2-layer D=32 Retriever; explicit seeds; CPU only.
Run: `PYTHONPATH=. python -m pytest tests/test_intent_prior.py -q`.
"""

from __future__ import annotations

import pytest
import torch
from conftest import N_FEATURES, randomise

from catalog.batch import constraint_vocab, encode_requests
from catalog.intent import IntentIndex
from core.carriers import Exclude, Recency, Request
from core.config import DataConfig, ModelConfig, RunConfig
from core.numerics import top_neighbours
from learner.checkpoint import load_checkpoint, save_checkpoint
from model.transformer import MASK, Retriever, masked_log_softmax
from rollout.sampler import sample_lists

pytestmark = pytest.mark.usefixtures("single_thread")
K = 8
# seeds 0, 20, 40 all have the genre Action (0: Action + Comedy, 20 and 40: Action) and the decade 1950 (7 i mod 70
# = 0); they share nothing else. Item 1: Comedy, 1957 (decade only); 2: Drama, 1964 (neither); 3: Horror + Action,
# 1971 (genre only); 4: Action, 1978 (genre only); 10: Drama, 1950 (decade only); 12: Action + Comedy, 1964 (genre
# only); 30: Drama + Horror, 1950 (decade only).
SEEDS = (0, 20, 40)
HAND = {1: (0, 1), 2: (0, 0), 3: (1, 0), 4: (1, 0), 10: (0, 1), 12: (1, 0), 30: (0, 1)}  # item: (genre, decade)


def intent_model(catalog, scale: float, ease: bool = True, seed: int = 0, gate: bool = False) -> Retriever:
    """A randomised tiny Retriever with a random EASE-like prior matrix (when `ease`) and the intent prior (gated
    per request with `gate`, model.intent_gate; the gate's weights are randomised too)."""
    generator = torch.Generator().manual_seed(2000 + seed)
    features = torch.randn(catalog.n_items, N_FEATURES, generator=generator)
    prior = top_neighbours(torch.rand(catalog.n_items, catalog.n_items, generator=generator).half(), 10) if ease \
        else None
    index = IntentIndex(catalog)
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=2, dropout=0.0, id_dropout=0.0, prior="ease+intent",
                      intent_gate=gate)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Retriever(cfg, features, len(constraint_vocab(catalog)), prior,
                          torch.from_numpy(index.values), torch.from_numpy(index.parts))
    randomise(model, seed)
    with torch.no_grad():
        model.intent_scale.fill_(scale)
    return model


def test_intent_prior_is_the_hand_counted_shared_values(tiny_catalog, tiny_vocab):
    """Without EASE and with intent_scale = (genre 2.0, decade 0.5), the prior of seeds (0, 20, 40) is
    2.0 [item has Action] + 0.5 [item is from the 1950s]: item 1 -> 0.5, 2 -> 0, 3 -> 2.0, 4 -> 2.0, 10 -> 0.5,
    12 -> 2.0, 30 -> 0.5 (HAND); every item by an independent count over the catalog. A single seed (item 0) shares
    all of its own values: 2.0 ([Action] + [Comedy]) + 0.5 [1950s]."""
    model = intent_model(tiny_catalog, 0.0, ease=False)
    index = IntentIndex(tiny_catalog)
    assert index.part_names == ["genre", "decade"]
    with torch.no_grad():
        model.intent_scale.copy_(torch.tensor([2.0, 0.5]))
    batch = encode_requests(tiny_catalog, [Request(SEEDS), Request(SEEDS[:1])], tiny_vocab)
    prior = model.prior_scores(batch)
    for item, (genre, decade) in HAND.items():
        assert prior[0, item].item() == 2.0 * genre + 0.5 * decade, item
    genres, years = tiny_catalog.attributes["genre"], tiny_catalog.years
    expected = torch.tensor([2.0 * ("Action" in genres[i]) + 0.5 * (1950 <= years[i] < 1960)
                             for i in range(tiny_catalog.n_items)])
    assert torch.equal(prior[0], expected)
    # one seed (item 0: Action, Comedy, 1950s) shares all of its own values
    single = torch.tensor([2.0 * (("Action" in genres[i]) + ("Comedy" in genres[i])) + 0.5 * (1950 <= years[i] < 1960)
                           for i in range(tiny_catalog.n_items)])
    assert torch.equal(prior[1], single)


def test_model_and_index_read_the_same_intent(tiny_catalog, tiny_vocab):
    """With every intent_scale 1 and no EASE, the model's prior equals IntentIndex.scores (the rival's boost)."""
    model = intent_model(tiny_catalog, 1.0, ease=False)
    requests = [Request(SEEDS), Request((1, 5, 9)), Request((3, 6)), Request((7,))]
    batch = encode_requests(tiny_catalog, requests, tiny_vocab)
    rival = IntentIndex(tiny_catalog).scores([r.seeds for r in requests])
    assert torch.equal(model.prior_scores(batch), torch.from_numpy(rival))
    assert rival[0].max() == 2 and rival[3].max() >= 2  # (0, 20, 40) share two values; one seed shares its own


def test_zero_intent_scale_gives_the_ease_prior(tiny_catalog, tiny_vocab):
    """intent_scale = 0: logits and fused masked logits equal, bit for bit, those of the same weights without the
    intent prior (today's EASE-only model)."""
    with_intent = intent_model(tiny_catalog, 0.0)
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=2, dropout=0.0, id_dropout=0.0, prior="ease")
    plain = Retriever(cfg, with_intent.features, len(tiny_vocab), with_intent.prior).eval()
    state = {k: v for k, v in with_intent.state_dict().items() if not k.startswith("intent_")}
    plain.load_state_dict(state)
    requests = [Request(SEEDS, (8,), (Exclude("genre", "Drama"),)), Request((3, 17, 29), (), (Recency(min_year=1970),))]
    batch = encode_requests(tiny_catalog, requests, tiny_vocab)
    slots = torch.tensor([[MASK, 12, MASK, MASK, 5, MASK, MASK, MASK]]).expand(len(requests), K)
    with torch.no_grad():
        outs = []
        for model in (with_intent, plain):
            ctx = model.encode(batch)
            hidden = model.hidden(ctx, slots)
            rows = torch.tensor([0, 1, 1])
            fused = model.allowed_logits(ctx, hidden[rows, torch.tensor([0, 2, 3])], rows, batch.valid)
            outs.append((model.logits(ctx, hidden), fused))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_gradients_reach_intent_scale(tiny_catalog, tiny_vocab):
    """d(sum of the prior)/d(intent_scale[p]) is the number of (request, item, shared value of part p) matches:
    seeds (0, 20, 40) -> genre: the Action items, decade: the 1950s items; seeds (1, 5) (Comedy 1957, Comedy 1985)
    -> genre: the Comedy items. Checked against IntentIndex counts of each part alone. Then -log p of an Action
    target (item 4) for seeds (0, 20, 40) falls as the genre weight rises: its gradient is E_p[count] - 1 < 0."""
    model = intent_model(tiny_catalog, 3.0)
    requests = [Request(SEEDS), Request((1, 5))]
    batch = encode_requests(tiny_catalog, requests, tiny_vocab)
    model.prior_scores(batch).sum().backward()
    for p, name in enumerate(["genre", "decade"]):
        part = IntentIndex(tiny_catalog, fields=["genre"] if name == "genre" else [], decade=name == "decade")
        assert model.intent_scale.grad[p].item() == part.scores([r.seeds for r in requests]).sum()
    assert model.intent_scale.grad[0] > 0 and model.intent_scale.grad[1] > 0
    model.zero_grad()
    ctx = model.encode(batch)
    logp = masked_log_softmax(model.logits(ctx, model.hidden(ctx, torch.full((2, K), MASK))), batch.valid[:, None])
    (-logp[0, 0, 4]).backward()  # item 4 (Action) is the target of slot 1 of the first request
    assert model.intent_scale.grad[0] < 0  # raising the genre weight raises the target's probability


def test_intent_gate_starts_at_one_and_weighs_each_request(tiny_catalog, tiny_vocab):
    """model.intent_gate: with the gate at its initial zeros, the prior is bit for bit the ungated one of the same
    weights; a gate bias of -30 on the genre part leaves (to float precision) only the decade's count; a randomised
    gate weighs each part by intent_scale * 2 sigmoid(g . c) and gives two requests with the same shared values
    different weights; the MOST-like loss reaches the gate's weights."""
    gated = intent_model(tiny_catalog, 3.0, gate=True)
    plain = intent_model(tiny_catalog, 3.0)
    requests = [Request(SEEDS), Request(SEEDS, (), (Exclude("genre", "Drama"),)), Request((1, 5))]
    batch = encode_requests(tiny_catalog, requests, tiny_vocab)
    with torch.no_grad():
        gated.intent_gate.weight.zero_()
        gated.intent_gate.bias.zero_()
        assert torch.equal(gated.prior_scores(batch), plain.prior_scores(batch))
        gated.intent_gate.bias.copy_(torch.tensor([-30.0, 0.0]))
        decade_only = intent_model(tiny_catalog, 3.0)
        decade_only.intent_scale.copy_(torch.tensor([0.0, 3.0]))
        torch.testing.assert_close(gated.prior_scores(batch), decade_only.prior_scores(batch))
    # without EASE the prior is the gated intent alone: requests 0 and 1 share the same values (the same seeds) but
    # differ in their constraint, so a gate that reads the pooled request vector weighs them apart
    alone = intent_model(tiny_catalog, 3.0, ease=False, gate=True)
    with torch.no_grad():
        prior = alone.prior_scores(batch)
        gates = 2 * torch.sigmoid(alone.intent_gate(alone.encode(batch).cond))  # (3, P)
    genre, decade = prior[0, 3], prior[0, 10]  # item 3 matches only the shared genre, item 10 only the decade
    torch.testing.assert_close(torch.stack([genre, decade]), alone.intent_scale.detach() * gates[0])
    assert not torch.allclose(prior[0][batch.valid[1]], prior[1][batch.valid[1]])
    ctx = gated.encode(batch)
    logp = masked_log_softmax(gated.logits(ctx, gated.hidden(ctx, torch.full((3, K), MASK))), batch.valid[:, None])
    (-logp[0, 0, 4]).backward()
    assert gated.intent_gate.weight.grad.abs().sum() > 0


def test_validity_masks_hold_with_the_intent_prior(tiny_catalog, tiny_vocab):
    """A large intent weight does not open invalid items: over 55 requests whose seeds share values (some exclude
    the very genre they share), sampled lists have K distinct valid items (no seed, negative or constraint violator)
    and invalid items get log-probability -inf."""
    model = intent_model(tiny_catalog, 50.0)
    requests = [Request((i, (i + 20) % 50, (i + 40) % 50), ((i + 1) % 50,), (Exclude("genre", "Action"),), K)
                for i in range(0, 50, 2)]
    requests += [Request((i, (i + 4) % 50), (), (Recency(min_year=1980),), K) for i in range(30)]
    batch = encode_requests(tiny_catalog, requests, tiny_vocab)
    out = sample_lists(model, batch, K, 3, 1.0, torch.Generator().manual_seed(3))
    for b, items in enumerate(out.items.tolist()):
        assert len(set(items)) == K and all(batch.valid[b, i] for i in items)
    with torch.no_grad():
        ctx = model.encode(batch)
        logp = masked_log_softmax(model.logits(ctx, model.hidden(ctx, torch.full((len(requests), K), MASK))),
                                  batch.valid[:, None])
    assert torch.isneginf(logp[~batch.valid[:, None].expand_as(logp)]).all()


def test_checkpoint_keeps_the_intent_prior(tiny_catalog, tiny_vocab, tmp_path):
    """save/load round-trips the intent buffers and scale: the reloaded model's prior is identical."""
    model = intent_model(tiny_catalog, 1.5)
    with torch.no_grad():
        model.intent_scale.copy_(torch.tensor([1.25, 4.0]))
    cfg = RunConfig(out_dir=str(tmp_path), data=DataConfig(catalog=str(tmp_path)), model=model.cfg)
    save_checkpoint(tmp_path / "m.safetensors", model, cfg, tiny_catalog, {"step": 0})
    loaded, loaded_cfg, _ = load_checkpoint(tmp_path / "m.safetensors", tiny_catalog)
    batch = encode_requests(tiny_catalog, [Request(SEEDS), Request((2, 9))], tiny_vocab)
    assert loaded_cfg.model.prior == "ease+intent" and torch.equal(loaded.intent_scale, model.intent_scale)
    assert torch.equal(loaded.prior_scores(batch), model.prior_scores(batch))


def test_zero_head_starts_at_the_prior(tiny_catalog, tiny_vocab):
    """model.zero_head: an untrained model's logits are exactly its prior in every slot (b_i = 0, W_o = 0), and the
    first MOST-like gradient reaches W_o (the residual can grow)."""
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=2, dropout=0.0, id_dropout=0.0, prior="ease+intent",
                      zero_head=True)
    index = IntentIndex(tiny_catalog)
    prior = top_neighbours(torch.rand(tiny_catalog.n_items, tiny_catalog.n_items,
                                      generator=torch.Generator().manual_seed(5)).half(), 10)
    model = Retriever(cfg, torch.randn(tiny_catalog.n_items, N_FEATURES), len(tiny_vocab), prior,
                      torch.from_numpy(index.values), torch.from_numpy(index.parts))
    batch = encode_requests(tiny_catalog, [Request(SEEDS), Request((3, 17, 29))], tiny_vocab)
    ctx = model.encode(batch)
    logits = model.logits(ctx, model.hidden(ctx, torch.full((2, K), MASK)))  # (2, K, N)
    assert torch.equal(logits, ctx.prior[:, None].expand_as(logits))
    logp = masked_log_softmax(logits, batch.valid[:, None])
    (-logp[:, 0, 4].sum()).backward()
    assert model.head.weight.grad.abs().sum() > 0
