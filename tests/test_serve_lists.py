"""What `h2po serve` answers with, without Ray (serving/lists.py): the request edge of an HTTP body, the policy and
the rivals as listers, title completion. Seconds, on the tiny checkpoint of conftest.py."""

from __future__ import annotations

import json

import numpy as np
import pytest

from catalog.dataset import Dataset
from core.carriers import Example, Exclude, Request
from core.config import DataConfig, ServeConfig
from core.errors import UserError
from evaluation.baselines import EASE
from serving.launch import serve_token, start
from serving.lists import BadRequest, answer, complete_titles, load_policy, load_rival, parse_body


def parse(catalog, value) -> tuple:
    return parse_body(json.dumps(value).encode(), catalog, 20, 64)


def test_body_edge_names_each_problem(tiny_catalog):
    """Malformed JSON and a non-object are 400; an unknown id and k beyond the valid pool (50 items - 1 seed = 49)
    are 422; each message names the problem, like the CLI's."""
    cases = [(b"{bad", 400, "malformed JSON"), (b"\xff\xfe", 400, "not UTF-8"), (b"5", 400, "JSON object"),
             (json.dumps({"seeds": [99999]}).encode(), 422, "unknown item id 99999"),
             (json.dumps({"seeds": [100], "k": 50}).encode(), 422, "only 49 items satisfy"),
             (json.dumps({"seeds": [100], "kk": 5}).encode(), 422, "unknown request key 'kk'"),
             (b"[]", 400, "a batch holds 1..64")]
    for body, status, words in cases:
        with pytest.raises(BadRequest) as err:
            parse_body(body, tiny_catalog, 20, 64)
        assert err.value.status == status and words in str(err.value), body


def test_batch_answers_each_entry_on_its_own(tiny_catalog):
    """A JSON array is the batch-retrieve format: a bad entry gets its error, the others their request."""
    batch, requests, errors = parse(tiny_catalog, [{"seeds": [100, "Item 1 (1957)"], "k": 5}, {"seeds": [1]}])
    assert batch and requests[0] == Request((0, 1), k=5) and requests[1] is None
    assert errors == [None, "unknown item id 1"]
    batch, requests, _ = parse(tiny_catalog, {"seeds": [102], "constraints": [
        {"type": "exclude", "field": "genre", "value": "Horror"}]})
    assert not batch and requests == [Request((2,), (), (Exclude("genre", "Horror"),), 20)]


def test_policy_lists_are_the_retrieve_lists(tiny_checkpoint, tiny_catalog):
    """The served policy samples greedily with the checkpoint's S unless serve.steps says otherwise; every list has
    k distinct items, no seed, and keeps the hard constraint; the answer carries titles."""
    lister = load_policy(tiny_checkpoint)
    assert lister.facts["steps"] == 10 and load_policy(tiny_checkpoint, steps=2).facts["steps"] == 2
    requests = [Request((0, 1), k=8), Request((5,), (), (Exclude("genre", "Horror"),), 12)]
    lists = lister.lists(requests)
    assert [len(x) for x in lists] == [8, 12] and all(len(set(x)) == len(x) for x in lists)
    assert not {0, 1} & set(lists[0]) and not tiny_catalog.has_value("genre", "Horror")[lists[1]].any()
    assert np.array_equal(lister.lists(requests)[1], lists[1])  # greedy: the same list again
    rows = answer(tiny_catalog, lists[0])
    assert rows[0] == {"rank": 1, "item_id": int(tiny_catalog.item_ids[lists[0][0]]),
                       "title": tiny_catalog.titles[lists[0][0]]}
    assert (lister.facts["device"], lister.facts["precision"]) == ("cpu", "fp32")
    on_cpu = load_policy(tiny_checkpoint, bf16=True)  # serve.bf16 autocasts on a GPU only: the same fp32 lists here
    assert on_cpu.facts["precision"] == "fp32" and all(map(np.array_equal, on_cpu.lists(requests), lists))


def test_rival_lister_is_the_evaluations_ease(tiny_checkpoint, tiny_catalog):
    """The served EASE (lambda from ease.json beside the checkpoint) gives EASE.recommend's lists, per k; without
    ease.json or serve.ease_lambda it refuses, saying what to set."""
    with pytest.raises(UserError, match="serve.ease_lambda"):
        load_rival("EASE", tiny_checkpoint)
    (tiny_checkpoint.parent / "ease.json").write_text(json.dumps({"lambda": 10.0}))
    try:
        lister = load_rival("EASE", tiny_checkpoint)
    finally:
        (tiny_checkpoint.parent / "ease.json").unlink()
    requests = [Request((0, 1), k=5), Request((3,), k=7), Request((4, 9), k=5)]
    ease = EASE(tiny_catalog, Dataset.build(tiny_catalog, DataConfig()).train_matrix, 10.0)
    for request, got in zip(requests, lister.lists(requests)):
        want = ease.recommend([Example(request, (), -1, "A", len(request.seeds))], request.k)[0]
        assert np.array_equal(got, want)
    tower = load_rival("two-tower", tiny_checkpoint)
    assert tower.facts["from"].startswith("defaults") and [len(x) for x in tower.lists(requests)] == [5, 7, 5]


def test_title_completion_prefix_first_then_contains(tiny_catalog):
    """"item 1" matches Item 1, Item 10..19 by prefix; "(1957)" only by containment; an empty query gives nothing."""
    titles = [row["title"] for row in complete_titles(tiny_catalog, "item 1", limit=50)]
    assert sorted(titles) == sorted(t for t in tiny_catalog.titles if t.startswith("Item 1"))
    assert {row["title"] for row in complete_titles(tiny_catalog, "(1957)")} == \
        {t for t in tiny_catalog.titles if "(1957)" in t}
    assert complete_titles(tiny_catalog, "  ") == []


def test_token_rules_and_bad_settings_fail_before_ray(monkeypatch, tiny_checkpoint):
    """Loopback needs no token; beyond it one is generated; a short one is refused; an unknown rival is refused
    before Ray starts."""
    monkeypatch.delenv("H2PO_SERVE_TOKEN", raising=False)
    assert serve_token("127.0.0.1", None) is None and len(serve_token("0.0.0.0", None)) >= 16
    with pytest.raises(UserError, match="16..200"):
        serve_token("127.0.0.1", "short")
    with pytest.raises(UserError, match="unknown rival 'ALS'"):
        start(tiny_checkpoint, ServeConfig(rivals=["ALS"]))
