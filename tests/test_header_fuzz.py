"""Fuzz test of the checkpoint reader (learner/checkpoint.py) with hypothesis (issue 14, section 5).

A checkpoint is data from outside: its header (safetensors metadata: format, config, catalog fingerprint, meta) and
its tensors may be anything. Generated files: headers with keys dropped, replaced by random text, by JSON of the
wrong shape, by a real config with one value mutated, or by huge text; tensors dropped, renamed or misshapen; and
files of random bytes. The property: `read_header`, `config_from_checkpoint` and `load_checkpoint` either succeed
or raise a one-line UserError (ConfigError and CatalogError are UserErrors), never another exception, each case
within a hard time limit.
Run: `python -m pytest tests/test_header_fuzz.py -q` (about 10 s).
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_catalog, time_limit
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from core.errors import UserError
from learner.checkpoint import config_from_checkpoint, load_checkpoint, read_header

CASES = settings(max_examples=150, deadline=timedelta(seconds=3), derandomize=True,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> tuple[dict, dict]:
    """(header, tensors) of a real tiny checkpoint, the material the cases mutate."""
    from conftest import write_tiny_checkpoint

    path = write_tiny_checkpoint(tmp_path_factory.mktemp("header_fuzz"))
    return read_header(path), load_file(str(path))


def _mutated_config(config: dict, data) -> str:
    """The real config with one leaf replaced by a generated JSON value."""
    section = data.draw(st.sampled_from(sorted(k for k, v in config.items() if isinstance(v, dict))))
    key = data.draw(st.sampled_from(sorted(config[section])))
    return json.dumps({**config, section: {**config[section], key: data.draw(JSON)}})


def _header_value(key: str, header: dict, data) -> str | None:
    kind = data.draw(st.sampled_from(["keep", "drop", "text", "json", "mutate", "huge"]))
    if kind == "keep":
        return header[key]
    if kind == "text":
        return data.draw(st.text(max_size=40))
    if kind == "json":
        return json.dumps(data.draw(JSON))
    if kind == "mutate" and key == "config":
        return _mutated_config(json.loads(header[key]), data)
    if kind == "huge":
        return "[" * 100_000
    return None


def _tensors(tensors: dict, data) -> dict:
    kind = data.draw(st.sampled_from(["keep", "drop", "reshape", "rename"]))
    names = sorted(tensors)
    name = data.draw(st.sampled_from(names))
    if kind == "drop":
        return {k: v for k, v in tensors.items() if k != name}
    if kind == "reshape":
        return {**tensors, name: torch.zeros(data.draw(st.integers(1, 5)), dtype=tensors[name].dtype)}
    if kind == "rename":
        return {("model.x" if k == name else k): v for k, v in tensors.items()}
    return tensors


def _reads_cleanly(path: Path, catalog) -> None:
    """Run every reader; only UserErrors of one line may escape."""
    for read in (read_header, lambda p: config_from_checkpoint(p, rewards=True), lambda p: load_checkpoint(p, catalog)):
        try:
            with time_limit(5.0):
                read(path)
        except UserError as err:
            assert "\n" not in str(err) and len(str(err)) < 2000, str(err)[:300]


@CASES
@given(data=st.data())
def test_generated_headers_and_tensors_load_or_fail_in_one_line(original, tmp_path, data):
    header, tensors = original
    new = {key: _header_value(key, header, data) for key in ("format", "config", "catalog", "meta")}
    new = {k: v for k, v in new.items() if v is not None}
    path = tmp_path / "most.safetensors"
    save_file(_tensors(tensors, data), str(path), metadata=new)
    _reads_cleanly(path, make_tiny_catalog())


@CASES
@given(raw=st.binary(max_size=2000), prefix=st.sampled_from([b"", b"\x10\x00\x00\x00\x00\x00\x00\x00{"]))
def test_random_bytes_are_not_a_checkpoint(tmp_path, raw, prefix):
    path = tmp_path / "most.safetensors"
    path.write_bytes(prefix + raw)
    _reads_cleanly(path, make_tiny_catalog())


def test_a_header_whose_meta_is_not_an_object_is_refused(original, tmp_path):
    """Hand-made: before check_header, meta "[1]" passed read_header and broke load_checkpoint with a TypeError."""
    header, tensors = original
    path = tmp_path / "most.safetensors"
    save_file(tensors, str(path), metadata={**header, "meta": "[1]"})
    with pytest.raises(UserError, match="'meta' is not a JSON object"):
        read_header(path)
