"""The request edge and the sampler's validity guarantee under bad numbers (issue 14, "Validity by construction").

Two depths: the edge (`request_from_json`, `check_request`, the `retrieve` flags) refuses a non-finite or
out-of-range Prefer weight, Recency half-life or minimum year, k, oversized lists, constraints, titles and lines
with one line that quotes a bounded prefix; and the sampler, fed non-finite soft scores directly (bypassing the
edge), still returns k distinct items with no seed or negative that satisfy every hard constraint.
Tiny catalog and untrained tiny model from conftest.py; the CLI runs in-process on `tiny_checkpoint`.
Run: `python -m pytest tests/test_request_edge.py -q`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace

import pytest
import torch
from conftest import time_limit

from app.cli import main
from catalog.batch import encode_requests
from catalog.requests import (
    MAX_CONSTRAINTS,
    MAX_LINE_BYTES,
    MAX_NEGATIVES,
    MAX_TITLE_CHARS,
    check_request,
    request_from_json,
    valid_mask,
)
from catalog.schema import CatalogError
from core.carriers import Exclude, Prefer, Recency, Request, Require
from rollout.sampler import sample_lists

pytestmark = pytest.mark.usefixtures("single_thread")
K = 6
BAD_NUMBERS = (math.nan, math.inf, -math.inf, 1e15, -1e15, 3e38)


def assert_valid(catalog, request: Request, items) -> None:
    """k distinct items, none a seed or a negative, each inside the request's valid mask (its hard constraints)."""
    items = [int(i) for i in items]
    assert len(items) == request.k and len(set(items)) == request.k, items
    assert not set(items) & set(request.seeds) and not set(items) & set(request.negatives), items
    assert valid_mask(catalog, request)[items].all(), items


# ---------------------------------------------------------------- the sampler, bypassing the edge


@pytest.mark.parametrize("temperature", [0.0, 1.0, 0.3])
@pytest.mark.parametrize("bad", BAD_NUMBERS)
def test_sampler_stays_valid_with_non_finite_soft_scores(tiny_catalog, tiny_vocab, tiny_model, tiny_prior_model,
                                                         bad, temperature):
    """Prefer weights and half-lives of NaN, +-inf and huge values reach the model unchecked (no check_request):
    the lists are still k distinct allowed items. Before the guard every slot took the same item (a seed)."""
    requests = [
        Request((0, 1), (2,), (Prefer("genre", "Comedy", bad), Require("genre", "Drama")), K),
        Request((4,), (), (Recency(min_year=1980, half_life=bad), Exclude("genre", "Action")), K),
        Request((5, 6, 7), (8, 9), (Prefer("genre", "Drama", bad), Recency(half_life=bad)), K),
    ]
    for model in (tiny_model, tiny_prior_model):
        batch = encode_requests(tiny_catalog, requests, tiny_vocab)
        out = sample_lists(model, batch, K, 3, temperature, torch.Generator().manual_seed(3))
        for request, items in zip(requests, out.items):
            assert_valid(tiny_catalog, request, items)
        assert torch.isfinite(out.logp).all()


def test_sampler_stays_valid_when_every_logit_is_nan(tiny_catalog, tiny_vocab, tiny_model):
    """A NaN written straight into the constraint scalars (and so into every hidden state and logit)."""
    requests = [Request((0,), (1,), (Require("genre", "Horror"), Prefer("genre", "Drama")), K)]
    batch = encode_requests(tiny_catalog, requests, tiny_vocab)
    batch = replace(batch, con_scalar=torch.full_like(batch.con_scalar, math.nan))
    for temperature in (0.0, 1.0):
        items = sample_lists(tiny_model, batch, K, 2, temperature, torch.Generator().manual_seed(0)).items[0]
        assert_valid(tiny_catalog, requests[0], items)


# ---------------------------------------------------------------- the edge: numbers


def request_json(**extra) -> dict:
    return {"seeds": [100, 101], "k": 5, **extra}


@pytest.mark.parametrize("constraint,words", [
    ({"type": "prefer", "field": "genre", "value": "Comedy", "weight": math.nan}, ("weight", "nan")),
    ({"type": "prefer", "field": "genre", "value": "Comedy", "weight": math.inf}, ("weight", "inf")),
    ({"type": "prefer", "field": "genre", "value": "Comedy", "weight": -math.inf}, ("weight", "-inf")),
    ({"type": "prefer", "field": "genre", "value": "Comedy", "weight": 1e15}, ("weight", "1e+15")),
    ({"type": "recency", "half_life": math.nan}, ("half_life", "nan")),
    ({"type": "recency", "half_life": math.inf}, ("half_life", "inf")),
    ({"type": "recency", "half_life": 1e9}, ("half_life", "1e+09")),
    ({"type": "recency", "min_year": 10 ** 30}, ("min_year", "1000000000000000000000000000000")),
    ({"type": "recency", "min_year": 0}, ("min_year", "0")),
])
def test_json_refuses_non_finite_and_out_of_range_numbers(tiny_catalog, constraint, words):
    """One CatalogError naming the field, the value and the allowed range; JSON's NaN/Infinity parse to floats."""
    data = json.loads(json.dumps(request_json(constraints=[constraint])))  # NaN/Infinity round-trip as in a file
    with pytest.raises(CatalogError) as err:
        request_from_json(tiny_catalog, data)
    message = str(err.value)
    assert all(w in message for w in words) and ".." in message and "\n" not in message, message


def test_k_above_the_models_table_is_refused(tiny_catalog):
    with pytest.raises(CatalogError, match=r"k=40 is outside 1\.\.32"):
        request_from_json(tiny_catalog, request_json(k=40), max_k=32)


# ---------------------------------------------------------------- the edge: sizes


def test_negatives_duplicate_check_is_linear_and_long_lists_are_refused(tiny_catalog):
    """100k negatives given directly to check_request: refused at once (main took minutes: `ids.count`)."""
    request = Request((0,), tuple(i % 50 for i in range(100_000)), (), 5)
    with time_limit(2.0), pytest.raises(CatalogError, match=f"at most {MAX_NEGATIVES}"):
        check_request(tiny_catalog, request)
    dup = Request((0,), tuple(range(1, 40)) + (3,), (), 5)
    with time_limit(2.0), pytest.raises(CatalogError, match="duplicate negative item"):
        check_request(tiny_catalog, dup)


@pytest.mark.parametrize("data,words", [
    ({"seeds": [100], "negatives": list(range(1_000_000))}, ("negatives", f"at most {MAX_NEGATIVES}")),
    ({"seeds": ["x"] * 1_000_000}, ("seeds", "at most 32")),
    ({"seeds": [100], "constraints": [{"type": "exclude", "field": "genre", "value": "Drama"}] * 10_000},
     ("constraints", f"at most {MAX_CONSTRAINTS}")),
])
def test_json_list_limits_refuse_fast(tiny_catalog, data, words):
    with time_limit(2.0), pytest.raises(CatalogError) as err:
        request_from_json(tiny_catalog, data)
    assert all(w in str(err.value) for w in words) and len(str(err.value)) < 300, str(err.value)


@pytest.mark.parametrize("data", [
    {"seeds": ["T" * 50_000_000]},
    {"seeds": [100], "negatives": ["9" * 50_000]},
    {"seeds": [100], "constraints": [{"type": "exclude", "field": "genre", "value": "V" * 1_000_000}]},
    {"seeds": [100], "constraints": [{"type": "exclude", "field": "F" * 1_000_000, "value": "x"}]},
    {"seeds": [100], "K" * 1_000_000: 1},
    {"seeds": {"x": "Y" * 1_000_000}},
    {"seeds": [100], "k": "Z" * 1_000_000},
    {"seeds": [100], "constraints": [{"type": "prefer", "field": "genre", "value": "Drama", "bogus": "B" * 10**6}]},
])
def test_errors_quote_a_bounded_prefix(tiny_catalog, data):
    """A 50 MB title or a megabyte field is never echoed whole: the message stays a short line."""
    with time_limit(5.0), pytest.raises(CatalogError) as err:
        request_from_json(tiny_catalog, data)
    assert len(str(err.value)) < 400 and "\n" not in str(err.value), str(err.value)[:500]


def test_title_limit(tiny_catalog):
    with pytest.raises(CatalogError, match=f"longer than {MAX_TITLE_CHARS}"):
        request_from_json(tiny_catalog, {"seeds": ["t" * (MAX_TITLE_CHARS + 1)]})


@pytest.mark.parametrize("ref", ["²", "１２３x", "٣"])
def test_odd_digit_strings_are_ids_or_titles_never_a_traceback(tiny_catalog, ref):
    with pytest.raises(CatalogError):
        request_from_json(tiny_catalog, {"seeds": [ref]})


# ---------------------------------------------------------------- the CLI


def run_cli(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("flags,words", [
    (["--prefer", "genre=Comedy:nan"], ("weight", "nan")),
    (["--prefer", "genre=Comedy:inf"], ("weight", "inf")),
    (["--prefer", "genre=Comedy:1e15"], ("weight", "1e+15")),
    (["--require", "genre=Comedy", "--prefer", "genre=Drama:-inf"], ("weight", "-inf")),
    (["--half-life", "nan"], ("half_life", "nan")),
    (["--half-life=-inf"], ("half_life", "-inf")),
    (["--min-year", "99999999999"], ("min_year", "99999999999")),
    (["--k", "100000000000000000000"], ("k=100000000000000000000",)),
])
def test_retrieve_flags_refuse_bad_numbers(tiny_checkpoint, capsys, flags, words):
    """Exit 2 with one `h2po: error:` line; main exited 0 with one seed repeated k times."""
    code, out, err = run_cli(capsys, "retrieve", "--checkpoint", tiny_checkpoint, "--seeds", "100", "101", "--k", "5",
                             *flags)
    assert code == 2 and out == "" and err.count("\n") == 1 and err.startswith("h2po: error:"), err
    assert all(w in err for w in words), err


def test_retrieve_flag_with_a_huge_title_is_one_short_line(tiny_checkpoint, capsys):
    code, _, err = run_cli(capsys, "retrieve", "--checkpoint", tiny_checkpoint, "--seeds", "T" * 5_000_000)
    assert code == 2 and err.count("\n") == 1 and len(err) < 400, err[:500]
    code, _, err = run_cli(capsys, "retrieve", "--checkpoint", tiny_checkpoint, "--seeds", "100",
                           "--exclude", "genre" + "=" * 3_000_000)
    assert code == 2 and err.count("\n") == 1 and len(err) < 400, err[:500]


def test_retrieve_valid_request_still_answers(tiny_checkpoint, tiny_catalog, capsys):
    code, out, _ = run_cli(capsys, "retrieve", "--checkpoint", tiny_checkpoint, "--seeds", "100", "101", "--k", "5",
                           "--require", "genre=Drama", "--prefer", "genre=Comedy:2.5", "--half-life", "10", "--json")
    assert code == 0
    items = [tiny_catalog.index_of(row["item_id"]) for row in json.loads(out)["items"]]
    assert_valid(tiny_catalog, Request((0, 1), (), (Require("genre", "Drama"),), 5), items)


def test_batch_bad_lines_are_line_errors(tiny_checkpoint, tiny_catalog, tmp_path, capsys):
    """NaN/Infinity weights, a 2 MB line, a 5000-digit integer and deep nesting are each one line's error; the
    good lines are answered with valid lists."""
    good = {"seeds": [100, 101], "k": 4, "constraints": [{"type": "require", "field": "genre", "value": "Drama"}]}
    bad_prefer = {"seeds": [100], "constraints": [{"type": "prefer", "field": "genre", "value": "Drama",
                                                   "weight": math.nan}]}
    lines = [json.dumps(good), json.dumps(bad_prefer),
             json.dumps({"seeds": [100], "constraints": [{"type": "recency", "half_life": math.inf}]}),
             json.dumps({"seeds": ["T" * (MAX_LINE_BYTES + 10)]}),
             '{"seeds": [' + "9" * 5000 + "]}",
             "[" * 200_000 + "]" * 200_000,
             json.dumps(good)]
    requests, out = tmp_path / "requests.jsonl", tmp_path / "out.jsonl"
    requests.write_text("\n".join(lines) + "\n")
    with time_limit(30.0):
        code, stdout, err = run_cli(capsys, "retrieve", "--checkpoint", tiny_checkpoint, "--requests", requests,
                                    "--out", out)
    assert code == 1 and "2 of 7 requests answered" in stdout
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [("items" in r) for r in results] == [True, False, False, False, False, False, True]
    assert "weight" in results[1]["error"] and "half_life" in results[2]["error"]
    assert f"{MAX_LINE_BYTES}" in results[3]["error"]
    assert all(len(line) < 400 for line in err.splitlines()) and len(err.splitlines()) == 5, err[:2000]
    request = Request((0, 1), (), (Require("genre", "Drama"),), 4)
    for r in (results[0], results[6]):
        assert_valid(tiny_catalog, request, [tiny_catalog.index_of(row["item_id"]) for row in r["items"]])


def test_batch_of_many_negatives_is_fast(tiny_checkpoint, tmp_path, capsys):
    """A line with 100k negatives (74 s on main) and one with 1M (never finished) are refused in a second or two."""
    requests, out = tmp_path / "requests.jsonl", tmp_path / "out.jsonl"
    requests.write_text("".join(json.dumps({"seeds": [100], "negatives": [101] * n}) + "\n"
                                for n in (100_000, 1_000_000)))
    start = time.monotonic()
    with time_limit(30.0):
        code, _, err = run_cli(capsys, "retrieve", "--checkpoint", tiny_checkpoint, "--requests", requests,
                               "--out", out)
    assert code == 1 and time.monotonic() - start < 15
    assert err.count(f"at most {MAX_NEGATIVES}") + err.count(f"longer than {MAX_LINE_BYTES}") == 2, err
