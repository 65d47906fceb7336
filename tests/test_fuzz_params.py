"""Fuzzing the settings (issue 15): whatever a params document or a `--set key=value` holds,
the only exception load_params and the override path may raise is GrainlabError, and its
message is one line of under 500 characters."""

import math
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from grainlab.config import apply_overrides, dump_yaml, flatten, load_params, nest
from grainlab.errors import GrainlabError

MAX_MESSAGE = 500
DEFAULTS = load_params(None)
KEYS = sorted(flatten(DEFAULTS))  # every real dotted key, e.g. tem.image_px
SECTIONS = sorted({k.rsplit(".", 1)[0] for k in KEYS if "." in k} | {"profiles", "profiles.paper"})
FUZZ = settings(max_examples=120, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=60)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**40), max_value=10**40),
    st.floats(allow_nan=True, allow_infinity=True),
    text,
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(text, inner, max_size=5)),
    max_leaves=20,
)
keys = st.one_of(st.sampled_from(KEYS), st.sampled_from(SECTIONS), text)
# YAML-ish text: the characters YAML gives meaning to, and a few words and numbers
yamlish = st.lists(
    st.one_of(
        st.sampled_from(list(":-[]{},&*!|>'\"#%@`?\n\n  \t.=")),
        st.sampled_from(["tem", "image_px", "profile", "profiles", "paper", "seed", "<<", "1e400", ".nan"]),
        st.sampled_from(["9" * 400, "9" * 5000, "2020-13-45", "!!binary x", "!!python/object:os.system"]),
        text,
    ),
    max_size=40,
).map("".join)


def _check(call):
    """Run call(); it may succeed or raise GrainlabError with a short one-line message, nothing else."""
    try:
        call()
    except GrainlabError as exc:
        message = str(exc)
        assert len(message) < MAX_MESSAGE, message[:1000]
        assert "\n" not in message, message


def _load_text(data: str | bytes, overrides=(), profile=None):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "params.yaml"
        if isinstance(data, bytes):
            path.write_bytes(data)
        else:
            path.write_text(data, encoding="utf-8")
        _check(lambda: load_params(path, overrides, profile))


@FUZZ
@given(key=keys, value=text)
def test_set_text_values(key, value):
    _check(lambda: load_params(None, [f"{key}={value}"]))


@FUZZ
@given(override=text)
def test_set_arbitrary_text(override):
    _check(lambda: load_params(None, [override]))


@FUZZ
@given(key=keys, value=values)
def test_set_parsed_values_and_apply_overrides(key, value):
    _check(lambda: load_params(None, [(key, value)]))
    _check(lambda: apply_overrides(DEFAULTS, {key: value}))


@FUZZ
@given(document=yamlish)
def test_yaml_ish_text_documents(document):
    _load_text(document)


@FUZZ
@given(document=st.binary(max_size=200))
def test_random_bytes_documents(document):
    _load_text(document)


@FUZZ
@given(document=st.dictionaries(keys, values, max_size=6))
def test_random_nested_documents(document):
    _load_text(yaml.safe_dump(document))


@FUZZ
@given(
    chosen=st.dictionaries(st.sampled_from(KEYS), values, min_size=1, max_size=4),
    profile=st.one_of(st.none(), st.sampled_from(["demo", "paper", "x"]), values),
    in_profile=st.booleans(),
)
def test_random_values_at_real_keys(chosen, profile, in_profile):
    """Random values at the real keys, in the sections or in a profile, with random profile names."""
    doc = {"profiles": {"paper": chosen}, "profile": "paper"} if in_profile else nest(chosen)
    if profile is not None:
        doc["profile"] = profile
    _load_text(dump_yaml(doc))


@pytest.mark.parametrize(
    "value",
    [math.nan, math.inf, 10**400, -(10**400), "9" * 5000, [[[]]] * 50],
    ids=["nan", "inf", "huge-int", "huge-negative-int", "long-text", "nested-lists"],
)
def test_extreme_values_at_every_real_key(value):
    """Every real key once with each extreme value: a clear error or a valid setting, never a crash."""
    for key in KEYS:
        _check(lambda key=key: load_params(None, [(key, value)]))
