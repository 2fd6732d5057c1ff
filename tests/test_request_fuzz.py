"""Fuzz test of request parsing and retrieval (catalog/requests.py, rollout/) with hypothesis (issue 14, section 5).

Generated JSON requests against the 50-item tiny catalog and tiny untrained Retrievers (conftest.py): seeds and
negatives by id (known, unknown, huge, as digit strings), by title (exact, without the year, unknown, odd text) or
of the wrong type; constraints of every type with random fields, values and extra keys, and weights, half-lives and
years that are NaN, infinite, huge, negative or not numbers; random k; and raw lines that are not JSON at all.
The properties:
- `parse_request_line` gives a request or a one-line CatalogError of bounded length, never another exception;
- a request it gives is answered with a valid list: k distinct items, no seed or negative, every hard constraint
  held (checked here from the catalog, not via `valid_mask`), at temperature 0 and 1;
- the sampler fed requests that bypass the edge (NaN/inf/huge soft weights and half-lives) still returns valid
  lists whenever the hard constraints leave k items;
- `h2po retrieve` with generated flags exits 0 or 2 (one line), never a traceback.
Each case runs under a hypothesis deadline and a hard SIGALRM limit, so a hang fails instead of stalling.
Run: `python -m pytest tests/test_request_fuzz.py -q` (a few hundred cases, about 10-30 s on one thread).
"""

from __future__ import annotations

import json
import math
from datetime import timedelta
from functools import lru_cache

import pytest
import torch
from conftest import GENRES, N_ITEMS, make_tiny_catalog, make_tiny_model, time_limit
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from app.cli import _constraints, build_parser, main
from catalog.batch import constraint_vocab, encode_requests
from catalog.requests import parse_request_line, resolve_items, valid_mask
from catalog.schema import CatalogError
from core.carriers import Exclude, Prefer, Recency, Request, Require
from core.config import SamplerConfig
from rollout.retrieve import recommend
from rollout.sampler import sample_lists

pytestmark = pytest.mark.usefixtures("single_thread")
CATALOG = make_tiny_catalog()
VOCAB = constraint_vocab(CATALOG)
MAX_K = 16  # the tiny models' checks use k up to this; the edge's own limit is tested in test_request_edge.py
CASE = settings(max_examples=200, deadline=timedelta(seconds=3), database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@lru_cache(maxsize=None)
def model(prior: bool):
    return make_tiny_model(CATALOG, prior=prior)


# ---------------------------------------------------------------- strategies

odd_numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(),
                        st.sampled_from([math.nan, math.inf, -math.inf, 1e15, -1e15, 1e308, 10 ** 30, 0, -1, 0.5]))
odd_values = st.one_of(odd_numbers, st.text(max_size=12), st.none(), st.booleans(), st.lists(st.integers(), max_size=3))
item_refs = st.one_of(
    st.integers(100, 100 + N_ITEMS - 1),  # known ids
    st.integers(100, 100 + N_ITEMS - 1).map(str),
    st.integers(0, N_ITEMS - 1).map(lambda i: CATALOG.titles[i]),  # exact titles
    st.integers(0, N_ITEMS - 1).map(lambda i: f"item {i}"),  # without the year, other case
    st.integers(), st.text(max_size=20), st.sampled_from(["²", "٣", " 101 ", "1e3", "-5", "9" * 40, ""]),
    odd_values,
)
fields = st.one_of(st.just("genre"), st.text(max_size=8), odd_values)
genre_values = st.one_of(st.sampled_from(GENRES), st.sampled_from(["comedy", "Western", ""]), st.text(max_size=8),
                         odd_values)
numbers = st.one_of(st.floats(-3, 3), st.integers(1900, 2030), st.floats(1, 50), odd_values)


@st.composite
def constraints(draw) -> dict:
    kind = draw(st.sampled_from(["exclude", "require", "prefer", "recency", "avoid", None]))
    out = {} if kind is None and draw(st.booleans()) else {"type": kind}
    if kind in ("exclude", "require", "prefer", "avoid"):
        out.update({"field": draw(fields), "value": draw(genre_values)})
    if kind == "prefer" and draw(st.booleans()):
        out["weight"] = draw(numbers)
    if kind == "recency":
        for key in ("min_year", "half_life"):
            if draw(st.booleans()):
                out[key] = draw(numbers)
    if draw(st.integers(0, 9)) == 0:
        out[draw(st.text(max_size=6))] = draw(odd_values)
    return out


@st.composite
def plausible_constraints(draw) -> dict:
    """A well-formed constraint on the catalog's genres whose numbers may still be NaN, infinite or huge."""
    kind = draw(st.sampled_from(["exclude", "require", "prefer", "recency"]))
    if kind == "recency":
        out = {"type": kind, "min_year": draw(st.one_of(st.none(), st.integers(1940, 2030), odd_numbers)),
               "half_life": draw(st.one_of(st.none(), st.floats(0.5, 50), odd_numbers))}
        return {k: v for k, v in out.items() if v is not None}
    out = {"type": kind, "field": "genre", "value": draw(st.sampled_from(GENRES))}
    if kind == "prefer":
        out["weight"] = draw(st.one_of(st.floats(-3, 3), odd_numbers))
    return out


@st.composite
def plausible_requests(draw) -> dict:
    """Distinct known seeds and negatives (by id, digit string or title), genre constraints, a small k."""
    order = draw(st.permutations(range(N_ITEMS)))
    s, m = draw(st.integers(1, 5)), draw(st.integers(0, 4))
    refs = [draw(st.sampled_from([int(CATALOG.item_ids[i]), str(CATALOG.item_ids[i]), CATALOG.titles[i]]))
            for i in order[:s + m]]
    return {"seeds": refs[:s], "negatives": refs[s:], "constraints": draw(st.lists(plausible_constraints(),
                                                                                   max_size=3)),
            "k": draw(st.integers(1, 8))}


@st.composite
def hostile_requests(draw) -> dict:
    """Any mix of plausible and odd keys, references, constraints and k."""
    data = {}
    if draw(st.integers(0, 9)):
        data["seeds"] = draw(st.lists(item_refs, max_size=6))
    if draw(st.booleans()):
        data["negatives"] = draw(st.lists(item_refs, max_size=6))
    if draw(st.booleans()):
        data["constraints"] = draw(st.lists(st.one_of(constraints(), plausible_constraints()), max_size=4))
    if draw(st.integers(0, 3)):
        data["k"] = draw(st.one_of(st.integers(1, MAX_K), st.integers(-3, 100), odd_values))
    if draw(st.integers(0, 14)) == 0:
        data[draw(st.text(max_size=6))] = draw(odd_values)
    return data


@st.composite
def request_lines(draw) -> str:
    """One line of a requests file: mostly a JSON object, most of them plausible; sometimes anything else."""
    shape = draw(st.integers(0, 19))
    if shape == 0:
        return draw(st.text(max_size=40))
    if shape == 1:
        return json.dumps(draw(odd_values))
    data = draw(plausible_requests() if shape < 15 else hostile_requests())
    return json.dumps(data)  # NaN and Infinity come out as the bare literals Python's json reads back


# ---------------------------------------------------------------- the checks


def holds(request: Request, item: int) -> bool:
    """Hard constraints checked from the catalog directly (not via valid_mask)."""
    genres = CATALOG.attributes["genre"][item]
    for c in request.constraints:
        if isinstance(c, Exclude) and c.value in genres or isinstance(c, Require) and c.value not in genres:
            return False
        if isinstance(c, Recency) and c.min_year is not None and not CATALOG.years[item] >= c.min_year:
            return False
    return True


def assert_valid(request: Request, items) -> None:
    items = [int(i) for i in items]
    assert len(items) == request.k and len(set(items)) == request.k, (request, items)
    assert not set(items) & (set(request.seeds) | set(request.negatives)), (request, items)
    assert all(holds(request, i) for i in items), (request, items)


def assert_one_line(err: Exception) -> None:
    message = str(err)
    assert message and "\n" not in message and len(message) < 500, message[:600]


@CASE
@given(line=request_lines(), temperature=st.sampled_from([0.0, 1.0]), prior=st.booleans())
def test_parsed_requests_are_answered_validly_or_refused_in_one_line(line, temperature, prior):
    with time_limit(10.0):
        try:
            request = parse_request_line(CATALOG, line, default_k=5, max_k=MAX_K)
        except CatalogError as err:
            assert_one_line(err)
            event(f"refused: {str(err).split(' ')[0]}")  # --hypothesis-show-statistics: what the cases exercised
            return
        event("answered")
        cfg = SamplerConfig(steps=3, temperature=temperature, batch_size=4)
        items = recommend(model(prior), CATALOG, VOCAB, [request], cfg, torch.Generator().manual_seed(0))[0]
    assert_valid(request, items)


soft_numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32),
                         st.sampled_from([math.nan, math.inf, -math.inf, 1e15, -1e30, 3e38]))


@st.composite
def unchecked_requests(draw) -> Request:
    """Requests built directly, as a caller bypassing the edge would: any soft numbers, real hard constraints."""
    order = draw(st.permutations(range(N_ITEMS)))
    s, m = draw(st.integers(1, 5)), draw(st.integers(0, 4))
    cons = [Prefer("genre", draw(st.sampled_from(GENRES)), draw(soft_numbers)) for _ in range(draw(st.integers(0, 2)))]
    if draw(st.booleans()):
        cons.append(Recency(min_year=draw(st.one_of(st.none(), st.integers(1950, 2010))), half_life=draw(soft_numbers)))
    if draw(st.booleans()):
        cons.append(draw(st.sampled_from([Exclude, Require]))("genre", draw(st.sampled_from(GENRES))))
    return Request(tuple(order[:s]), tuple(order[s:s + m]), tuple(cons), draw(st.integers(1, 10)))


@CASE
@given(requests=st.lists(unchecked_requests(), min_size=1, max_size=4), temperature=st.sampled_from([0.0, 0.7, 1.0]),
       prior=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_sampler_is_valid_whatever_the_soft_scores(requests, temperature, prior, seed):
    k = requests[0].k
    requests = [Request(r.seeds, r.negatives, r.constraints, k) for r in requests
                if valid_mask(CATALOG, r).sum() >= k]
    if not requests:
        return
    with time_limit(10.0):
        out = sample_lists(model(prior), encode_requests(CATALOG, requests, VOCAB), k, 3, temperature,
                           torch.Generator().manual_seed(seed))
    for request, items in zip(requests, out.items):
        assert_valid(request, items)
    assert bool(torch.isfinite(out.logp).all())


flag_text = st.one_of(st.sampled_from(["genre=Comedy", "genre=Drama:nan", "genre=Comedy:inf", "genre=Horror:1e15",
                                       "genre=Action:-2", "genre=", "=Comedy", "genre=Comedy:", "nogenre", ":"]),
                      st.text(max_size=16))


@settings(CASE, max_examples=30)
@given(seeds=st.lists(item_refs.map(str), min_size=1, max_size=3),
       flags=st.lists(st.tuples(st.sampled_from(["--exclude", "--require", "--prefer"]), flag_text), max_size=3),
       numbers=st.lists(st.tuples(st.sampled_from(["--min-year", "--half-life", "--k"]),
                                  st.sampled_from(["nan", "inf", "-inf", "1e15", "0", "-3", "1990", "12.5", "5", "x",
                                                   "99999999999999999999"])), max_size=2))
def test_retrieve_flags_exit_0_or_2(tiny_checkpoint, capsys, seeds, flags, numbers):
    argv = ["retrieve", "--checkpoint", str(tiny_checkpoint), "--json", "--k", "4", "--seeds", *seeds]
    for flag, value in flags + numbers:
        argv.append(f"{flag}={value}")  # the = form, so values starting with '-' stay values
    capsys.readouterr()
    with time_limit(10.0):
        try:
            code = main(argv)
        except SystemExit as exit_:  # argparse: a value of the wrong type (int/float flags)
            code = exit_.code
    out, err = capsys.readouterr()
    assert code in (0, 2), err[-600:]
    if code == 0:  # the request the CLI answered, rebuilt with its own parser: the list must satisfy it
        args = build_parser().parse_args(argv)
        request = Request(tuple(resolve_items(CATALOG, args.seeds)), (), _constraints(args), args.k)
        assert_valid(request, [CATALOG.index_of(row["item_id"]) for row in json.loads(out)["items"]])
    else:
        lines = err.strip().splitlines()  # h2po's one line, or argparse's usage + one error line (a bad int/float)
        assert "Traceback" not in err and lines and ": error: " in lines[-1] and len(lines[-1]) < 500, err[-600:]
        assert len(lines) == 1 or lines[0].startswith("usage:"), err[-600:]
