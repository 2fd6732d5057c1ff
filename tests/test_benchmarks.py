"""Tests of the benchmark scripts' own logic (not timings): the per-request reference sampler, the FLOP count, and
the H2PO probe's pairing.

The reference in benchmarks/sampler.py re-implements DESIGN 3.4 one request at a time; if it drifted from the
batched sampler, the throughput comparison would compare different algorithms. Tiny models from conftest.py.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from catalog.batch import encode_requests
from catalog.requests import valid_mask
from core.carriers import Exclude, Recency, Request
from core.config import SamplerConfig
from rollout.retrieve import recommend
from rollout.sampler import sample_lists

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import sampler as bench

pytestmark = pytest.mark.usefixtures("single_thread")
K = 8
TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")


def some_requests(catalog, n: int, seed: int) -> list[Request]:
    """n random requests (1-5 seeds, 0-2 negatives, sometimes Exclude / min-year) that allow >= K items."""
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        items = rng.permutation(catalog.n_items)
        s, m = int(rng.integers(1, 6)), int(rng.integers(0, 3))
        cons = [Exclude("genre", "Horror")] if rng.random() < 0.4 else []
        cons += [Recency(min_year=int(rng.integers(1950, 1990)))] if rng.random() < 0.4 else []
        request = Request(tuple(int(i) for i in items[:s]), tuple(int(i) for i in items[s:s + m]), tuple(cons), K)
        if valid_mask(catalog, request).sum() >= K:
            out.append(request)
    return out


@pytest.mark.parametrize("prior", [False, True])
@pytest.mark.parametrize("steps", [1, 3, 8])
def test_reference_greedy_equals_batched_sampler(tiny_catalog, tiny_vocab, tiny_model, tiny_prior_model, prior,
                                                 steps):
    """At T=0 both are deterministic and implement the same algorithm: identical lists on 40 requests."""
    model = tiny_prior_model if prior else tiny_model
    requests = some_requests(tiny_catalog, 40, seed=steps)
    batched = sample_lists(model, encode_requests(tiny_catalog, requests, tiny_vocab), K, steps).items.numpy()
    reference = bench.reference_lists(model, tiny_catalog, tiny_vocab, requests, steps, 0.0)
    np.testing.assert_array_equal(np.stack(reference), batched)


def test_served_greedy_lists_hold_the_reference_items(tiny_catalog, tiny_vocab, tiny_prior_model):
    """`recommend` serves in sampler.order (default "score": re-sorted), so the benchmark compares item sets: every
    served greedy list holds the reference's items on 40 requests, though some come in another order."""
    requests = some_requests(tiny_catalog, 40, seed=5)
    served = recommend(tiny_prior_model, tiny_catalog, tiny_vocab, requests, SamplerConfig(steps=3))
    reference = bench.reference_lists(tiny_prior_model, tiny_catalog, tiny_vocab, requests, 3, 0.0)
    assert SamplerConfig().order == "score" and bench.same_items_share(served, reference) == 1.0
    assert not all(np.array_equal(a, b) for a, b in zip(served, reference))


def test_reference_samples_are_valid(tiny_catalog, tiny_vocab, tiny_prior_model):
    """At T=1: k distinct items, no seeds or negatives, constraints met, on 40 requests."""
    requests = some_requests(tiny_catalog, 40, seed=11)
    lists = bench.reference_lists(tiny_prior_model, tiny_catalog, tiny_vocab, requests, 3, 1.0,
                                  torch.Generator().manual_seed(0))
    bench.check_lists(tiny_catalog, requests, lists)


def test_check_lists_rejects_a_duplicate(tiny_catalog):
    request = Request((0,), k=3)
    with pytest.raises(AssertionError, match="duplicate"):
        bench.check_lists(tiny_catalog, [request], [np.array([5, 5, 6])])


def test_flops_per_list_hand_computed():
    """D=2, 1 layer, N=10, K=2, S=1, 1 context token -> L=3:
    blocks 24*3*4 + 4*9*2 + 12*4 = 408; output 4*4 + 2*2*4 = 32; head 2*2*2*10 = 80; total 520 (x S=3: 1560)."""
    assert bench.flops_per_list(2, 1, 10, 2, 1, 1.0) == 520
    assert bench.flops_per_list(2, 1, 10, 2, 3, 1.0) == 1560


def test_head_flops_are_the_item_head_term():
    """The same D=2, N=10, K=2: the head's 2*2*2*10 = 80 FLOPs per step (x S=3: 240), the part of the floor that
    stays fp32 under bf16 autocast."""
    assert bench.head_flops_per_list(2, 10, 2, 1) == 80
    assert bench.head_flops_per_list(2, 10, 2, 3) == 240


def test_bf16_is_refused_without_a_gpu(capsys):
    """--bf16 on the CPU would measure float32 under a bf16 label (system.bf16 autocasts on a GPU only)."""
    with pytest.raises(SystemExit):
        bench.parse_args(["--bf16"])
    assert "--bf16 needs --device cuda" in capsys.readouterr().err


# ---------------------------------------------------------------- benchmarks/probe.py


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A tiny MOST checkpoint and logged preferences on the real data, laid out as `h2po run` leaves them."""
    from app.cli import main

    run = tmp_path_factory.mktemp("probe_run")
    overrides = [f"out_dir={run}", "threads=1"]
    assert main(["pretrain", "--config", TINY, *overrides]) == 0
    assert main(["data", "preferences", "--out", str(run / "preferences.parquet"), "--config", TINY, *overrides]) == 0
    return run


def run_probe(monkeypatch, tmp_path, run: Path, *args: str) -> dict:
    import probe

    out = tmp_path / "probe.json"
    monkeypatch.setattr(sys, "argv", ["probe.py", "--run", str(run), "--steps", "2", "--eval-every", "1",
                                      "--threads", "1", "--out", str(out), *args])
    probe.main()
    return json.loads(out.read_text())


def test_probe_differences_are_paired_against_most(tiny_run, tmp_path, monkeypatch, capsys):
    """lr 0: the policy never moves, so every paired difference on both splits is exactly 0 (the probe scores like
    with like). lr 1e-3, on-policy only, item residuals frozen: each step records its loss terms, the off-policy
    term is absent, and the frozen parameters are named."""
    still = run_probe(monkeypatch, tmp_path, tiny_run, "h2po.lr=0")
    assert set(still["final"]) == {"val", "test"}
    assert all(diff == [0.0, 0.0, 0.0] for split in still["final"].values() for diff in split.values())
    assert still["history"][0]["val"] == still["final"]["val"] and len(still["history"]) == 2
    moved = run_probe(monkeypatch, tmp_path, tiny_run, "--terms", "on", "--freeze", "item_residual", "h2po.lr=1e-3")
    assert [h["step"] for h in moved["history"]] == [1, 2]
    assert all(h["loss/off"] == 0.0 and math.isfinite(h["loss/on"]) and h["kl"] >= 0 for h in moved["history"])
    assert "frozen: item_residual" in capsys.readouterr().out


def test_learner_step_times_rollouts_and_an_update_on_cpu(tiny_run, tmp_path):
    """benchmarks/learner_step.py on the tiny checkpoint (h2po.batch_requests 2 x group 2): one timed repetition of
    each part after one warm-up, positive and finite; on the CPU there is no GPU memory figure."""
    import learner_step

    out = tmp_path / "learner.json"
    result = learner_step.main(["--checkpoint", str(tiny_run / "most.safetensors"), "--steps", "1", "--warmup", "1",
                                "--threads", "1", "--workdir", str(tiny_run), "--out", str(out)])
    assert json.loads(out.read_text())["seconds"] == result["seconds"]
    assert all(len(v) == 1 and 0 < v[0] < math.inf for v in result["seconds"].values())
    assert result["rollout_lists_per_s"] > 0 and result["peak_gpu_gib"] is None
    assert result["settings"]["batch_requests"] * result["settings"]["group_size"] == 4


def test_ablation_variants_take_pairs_although_the_main_job_has_none():
    """configs/default.yaml trains on-policy only (h2po.pairs_per_step=0); from its config the ablation's hybrid
    still takes h2po.batch_requests pairs per step next to the rollouts, off-policy only the same pairs and no
    rollouts, on-policy only the config as it is. An explicit pair count is kept."""
    import ablation

    from core.config import load_config

    default = str(Path(__file__).resolve().parents[1] / "configs" / "default.yaml")
    cfg = load_config(default)
    requests = cfg.h2po.batch_requests
    assert cfg.h2po.pairs_per_step == 0 and requests > 0
    variants = {name: ablation.variant_config(cfg, name) for name in ablation.VARIANTS}
    assert (variants["hybrid"].h2po.pairs_per_step, variants["hybrid"].h2po.batch_requests) == (requests, requests)
    assert (variants["off"].h2po.pairs_per_step, variants["off"].h2po.batch_requests) == (requests, 0)
    assert variants["on"] == cfg
    explicit = load_config(default, ["h2po.pairs_per_step=4"])
    assert ablation.variant_config(explicit, "off").h2po.pairs_per_step == 4


def test_pooled_averages_runs_then_resamples_users():
    """Two runs' per-request differences on four requests (two users, families A and B): each group's per-run
    means, the mean over runs and the between-run sd (hand-computed). Family A's run-averaged differences are
    equal on both requests (a zero-width interval); family B's are 0.1 and 0.2, so its interval lies between."""
    import pooled

    from core.carriers import Example, Request

    test = [Example(Request((i,)), (9,), user, family, 1) for i, (user, family) in
            enumerate([(0, "A"), (1, "A"), (0, "B"), (1, "B")])]
    diffs = {"r1": np.array([0.10, 0.30, 0.20, 0.20]), "r2": np.array([0.30, 0.10, 0.00, 0.20])}
    out = pooled.pool(diffs, test, n_boot=200, seed=0)
    assert out["A"]["runs"] == pytest.approx({"r1": 0.2, "r2": 0.2}) and out["A"]["mean"] == pytest.approx(0.2)
    assert out["A"]["sd_between_runs"] == pytest.approx(0.0)
    assert out["A"]["ci"] == pytest.approx([0.2, 0.2])  # (0.2, 0.2) on both requests after averaging the runs
    assert out["B"]["runs"] == pytest.approx({"r1": 0.2, "r2": 0.1}) and out["B"]["mean"] == pytest.approx(0.15)
    assert out["B"]["sd_between_runs"] == pytest.approx(math.sqrt(0.005))
    assert 0.1 <= out["B"]["ci"][0] <= 0.15 <= out["B"]["ci"][1] <= 0.2
    assert out["A/s=1"]["n"] == 2 and set(out) == {"A", "A/s=1", "B", "B/s=1"}


def test_pooled_scores_a_run_directory(tiny_run, tmp_path, monkeypatch, capsys):
    """End to end on the tiny run: the MOST checkpoint as its own policy differs by exactly 0 on every request,
    in both families, also with `--set eval.test_draws=2` (more requests); a missing policy is a usage error
    naming it."""
    import pooled

    out = tmp_path / "pooled.json"
    spec = f"{tiny_run}:most.safetensors"
    monkeypatch.setattr(sys, "argv", ["pooled.py", spec, spec, "--bootstrap", "50", "--out", str(out)])
    pooled.main()
    result = json.loads(out.read_text())["results"]
    assert {"A", "B"} <= set(result)
    assert all(r["mean"] == 0.0 and r["ci"] == [0.0, 0.0] for r in result.values())
    assert "sd over runs" in capsys.readouterr().out
    # --set reaches the scoring: two draws per test user give more requests, still paired exactly
    monkeypatch.setattr(sys, "argv", ["pooled.py", spec, "--bootstrap", "50", "--out", str(out),
                                      "--set", "eval.test_draws=2"])
    pooled.main()
    drawn = json.loads(out.read_text())["results"]
    assert drawn["A"]["n"] > result["A"]["n"] and drawn["A"]["mean"] == 0.0
    monkeypatch.setattr(sys, "argv", ["pooled.py", f"{tiny_run}:missing.safetensors"])
    with pytest.raises(SystemExit):
        pooled.main()
    assert "missing.safetensors" in capsys.readouterr().err


# ---------------------------------------------------------------- benchmarks/splits.py

def test_splits_summary_pools_requests_and_clusters_users():
    """Two splits' per-request figures: pooled, a user in both splits is one user, the means are over all requests
    (hand-computed), and MOST - rival is paired request by request."""
    import splits

    one = {"users": np.array([0, 1]), "family": np.array(["B", "B"]), "most": np.array([0.5, 0.3]),
           "rival": np.array([0.4, 0.3])}
    two = {"users": np.array([1, 2]), "family": np.array(["B", "B"]), "most": np.array([0.2, 0.6]),
           "rival": np.array([0.2, 0.2])}
    out = splits.summary([one, two], n_boot=200)["B"]
    assert (out["requests"], out["users"]) == (4, 3)
    assert out["most"][0] == pytest.approx(0.4) and out["rival"][0] == pytest.approx(0.275)
    assert out["diff"][0] == pytest.approx(0.125) and out["diff"][1] <= 0.125 <= out["diff"][2]
    alone = splits.summary([one], n_boot=200)["B"]
    assert (alone["users"], alone["diff"][0]) == (2, pytest.approx(0.05))


def test_splits_end_to_end_reuses_each_split(tmp_path, monkeypatch, capsys):
    """Two splits of the tiny config: each split has its own test users, the pooled rows count every request of
    both, and a second call reuses both MOST checkpoints and gives the same figures."""
    import splits

    def run(name: str) -> dict:
        out = tmp_path / name
        monkeypatch.setattr(sys, "argv", ["splits.py", "--config", TINY, "--splits", "0", "1", "--root",
                                          str(tmp_path / "root"), "--bootstrap", "50", "--out", str(out),
                                          "threads=1", "most.max_steps=4", "most.eval_every=2"])
        splits.main()
        return json.loads(out.read_text())

    first = run("first.json")
    assert "MOST 4 steps" in capsys.readouterr().out
    result = first["results"]
    for family in ("A", "B"):
        parts = [result[s][family] for s in ("0", "1")]
        assert result["pooled"][family]["requests"] == sum(p["requests"] for p in parts)
        assert max(p["users"] for p in parts) < result["pooled"][family]["users"] <= sum(p["users"] for p in parts)
    again = run("again.json")
    assert capsys.readouterr().out.count("MOST reused from") == 2
    assert again["results"] == first["results"] and again["best"] == first["best"]


# ---------------------------------------------------------------- benchmarks/ablations.py

def test_ablations_decoding_stats_hand_computed():
    """step_of of two lists of three slots at S = 1: the first list committed its last slot in a second pass (its
    one-step draw collided), the second list none -> passes (2 + 1) / 2 = 1.5, redrawn 1/6 of the slots, 1/2 of the
    lists. At S = 2 a slot in pass 2 may just be the schedule, so the redraw shares are undefined (None)."""
    import ablations

    step_of = np.array([[0, 0, 1], [0, 0, 0]])
    assert ablations.decoding_stats(step_of, 1) == pytest.approx({"passes": 1.5, "redrawn": 1 / 6, "lists": 0.5})
    assert ablations.decoding_stats(step_of, 2) == {"passes": 1.5, "redrawn": None, "lists": None}


@pytest.mark.parametrize("prior", [False, True])
def test_ablations_one_pass_is_valid_and_starts_like_the_sampler(tiny_catalog, tiny_vocab, tiny_model,
                                                                 tiny_prior_model, prior):
    """One forward pass, 60 random requests: k distinct allowed items per list, and the most confident slot of the
    first pass (the sampler's S = 1 commits it in that pass; its log-prob is the largest there) holds the same item
    as in the sampler's list."""
    import ablations

    model = (tiny_prior_model if prior else tiny_model).eval()
    batch = encode_requests(tiny_catalog, some_requests(tiny_catalog, 60, seed=5), tiny_vocab)
    lists = ablations.one_pass(model, batch, K)
    assert all(len(set(row.tolist())) == K for row in lists) and batch.valid.gather(1, lists).all()
    sampled = sample_lists(model, batch, K, 1)
    top = sampled.logp.masked_fill(sampled.step_of > 0, float("-inf")).argmax(1, keepdim=True)  # (B, 1)
    assert torch.equal(lists.gather(1, top), sampled.items.gather(1, top))
    assert (lists != sampled.items).any()  # collisions: the one pass differs from the sampler's further passes


def test_ablations_scores_checkpoints_at_several_steps(tiny_run, tmp_path, monkeypatch, capsys):
    """End to end on the tiny run: `decode` at the config's S gives the evaluation's own lists
    (`pipeline.model_recommender`); the same checkpoint under a second name differs from the reference by exactly 0
    at the same S; the S = 1 and one-pass rows, in slot and in score order, are valid lists; an unknown --reference is a usage error naming it."""
    import ablations

    from app import pipeline

    checkpoint = tiny_run / "most.safetensors"
    _, ws, model = ablations.load(str(checkpoint), [])
    test = pipeline.examples(ws, "test")[:64]
    lists, step_of = ablations.decode(ws, model, test, ws.cfg.sampler.steps, ws.cfg.sampler.order)
    np.testing.assert_array_equal(lists, pipeline.model_recommender(ws, model)(test))
    assert step_of.min() == 0 and step_of.max() >= ws.cfg.sampler.steps - 1
    out = tmp_path / "ablations.json"
    monkeypatch.setattr(sys, "argv", ["ablations.py", f"{checkpoint}=a", f"{checkpoint}=b", "--steps", "10,1,1p",
                                      "--orders", "slots,score", "--bootstrap", "50", "--out", str(out)])
    ablations.main()
    result = json.loads(out.read_text())
    assert result["reference"] == "a S=10" and {"A", "B"} <= set(result["results"])
    for group in result["results"].values():
        assert group["b S=10"]["ndcg@10_vs_a S=10"] == 0.0 and group["b S=10"]["ndcg@10_vs_a S=10_ci"] == [0.0, 0.0]
        assert group["a S=1"]["duplicates"] == 0.0 and group["a S=1"]["constraint_sat"] == 1.0
        assert "ndcg@10_vs_b S=10" in group["b S=1"]  # each checkpoint's S = 1 row against its own S = 10
        assert group["a S=10 by score"]["duplicates"] == 0.0 and group["a S=10 by score"]["constraint_sat"] == 1.0
        assert "ndcg@10_vs_b S=10" in group["b 1-pass by score"]
    one_shot = result["decoding"]["a S=1"]["A"]
    assert one_shot["passes"] >= 1.0 and 0.0 <= one_shot["redrawn"] <= one_shot["lists"] <= 1.0
    assert result["decoding"]["a 1-pass"]["A"] == {"passes": 1.0, "redrawn": None, "lists": None}
    assert result["results"]["A"]["a 1-pass"]["duplicates"] == 0.0
    assert "redrawn slots / lists" in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", ["ablations.py", f"{checkpoint}=a", "--reference", "nope S=1"])
    with pytest.raises(SystemExit):
        ablations.main()
    assert "nope S=1" in capsys.readouterr().err


# ---------------------------------------------------------------- benchmarks/scaling.py
SCALING_TINY = ["--min-users", "150", "--requests", "4", "--batch", "4", "--iters", "1", "--threads", "1",
                "model.d_model=16", "model.n_layers=1", "model.n_heads=2", "data.cf_dim=8", "model.prior_items=200",
                "model.prior_neighbours=10", "most.batch_size=4", "h2po.batch_requests=2", "h2po.group_size=2"]


def test_scaling_growth_exponent_hand_computed():
    """figure = 3 N^2 on N = 10, 100, 1000 -> slope 2; a missing or non-positive figure is left out; one point
    gives no slope."""
    import scaling

    assert scaling.growth([10, 100, 1000], [300, 30000, 3e6]) == pytest.approx(2.0)
    assert scaling.growth([10, 100, 1000], [1.0, None, 10.0]) == pytest.approx(1 / 2)
    assert scaling.growth([10, 100], [0.0, 5.0]) is None


def test_scaling_table_at_tiny_n(tmp_path):
    """N = 300 and 600 in their own processes with a tiny model: every row measured and positive, the checkpoint
    grows about linearly (item residuals, features and prior rows are all N x something), the table has a line per
    row, and a size whose config is refused comes back with its exit status and error line instead of stopping."""
    import scaling

    out = scaling.main(["--sizes", "300", "600", "--workdir", str(tmp_path), "--out", str(tmp_path / "s.json"),
                        *SCALING_TINY])
    assert [r["n_items"] for r in out["results"]] == [300, 600] and all(r["returncode"] == 0 for r in out["results"])
    for key, *_ in scaling.ROWS:
        assert all(r[key] > 0 for r in out["results"]), key
    assert 0.7 < out["growth_exponents"]["checkpoint_mb"] < 1.2
    assert len(out["table"].splitlines()) == len(scaling.ROWS) + 2
    assert json.loads((tmp_path / "s.json").read_text())["results"][1]["n_items"] == 600
    failed = scaling.main(["--sizes", "300", "--workdir", str(tmp_path), *SCALING_TINY, "model.n_heads=3"])
    assert failed["results"][0]["returncode"] != 0 and "n_heads" in failed["results"][0]["error"]
