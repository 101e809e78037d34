"""Bad input, generated (hypothesis): whatever the overrides or the dataset rows, `duet train --dry-run`
either accepts them or ends in one line that names the field or the row, never a traceback. In-process
through the CLI's entry function; no Ray."""

from __future__ import annotations

import json
import math
import re
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from cluster.cli import main
from cluster.config import Config

SETTINGS = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)

FIELDS = [
    f"{section}.{name}" for section, f in Config.model_fields.items() for name in f.annotation.model_fields
]
# Fields whose valid values make a dry run do work in proportion to them (rows generated, plan lines):
# generated integers stay small enough for that.
small_ints = st.integers(min_value=-3, max_value=3000)
yaml_values = st.one_of(
    small_ints.map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(
        lambda x: repr(x).replace("inf", ".inf").replace("nan", ".nan")
    ),
    st.sampled_from(["true", "false", "null", "[]", "{}", "[1, 2]", "{a: 1}", "''", "~", "!!binary aGk="]),
    st.text(max_size=30),  # anything at all, YAML or not
)
keys = st.one_of(
    st.sampled_from(FIELDS),  # a real field, with a value that may be wrong
    st.sampled_from(FIELDS).map(lambda k: k + "x"),  # a typo in a field's name
    st.sampled_from(list(Config.model_fields)),  # a whole section set to a scalar
    st.text(
        alphabet=st.characters(blacklist_characters="=", blacklist_categories=("Cs",)),
        min_size=1,
        max_size=20,
    ).filter(lambda k: not k.startswith("-")),  # a leading '-' is an option: argparse's usage message
)


def dry_run(capsys, *argv: str) -> tuple[int, list[str]]:
    import ray

    try:
        rc = main(["train", "--dry-run", *argv])
    except SystemExit as e:
        rc = e.code
    except Exception as e:
        pytest.fail(f"duet train --dry-run {argv} raised {type(e).__name__}: {e}")
    assert not ray.is_initialized()
    return rc, capsys.readouterr().err.strip().splitlines()


@SETTINGS
@given(key=keys, value=yaml_values)
@example(key="cluster.engine_resources", value="{a: 1}")  # valid, but no node offers 'a'
def test_any_override_is_accepted_or_named_in_one_line(capsys, key, value):
    rc, lines = dry_run(capsys, f"{key}={value}")
    if rc == 0:
        return
    if rc == 1 and "cannot hold the placement plan" in lines[0]:
        # A valid config this machine cannot hold: preflight's refusal lists what is missing, over several
        # lines by design, and names the field that asked for it.
        assert key.strip() in "\n".join(lines), (key, lines)
        return
    assert rc == 2 and len(lines) == 1, lines
    line = lines[0]
    parts = key.strip().split(".")
    # The line names the field, or the section (or the override itself) where the key goes wrong.
    # (names with control characters are shown quoted, as repr() writes them, to keep the message one line)
    shown = [p if p.isprintable() else repr(p) for p in parts]
    named = [".".join(shown[:i]) for i in range(len(parts), 0, -1)]
    assert any(n.strip() and n.strip() in line for n in named) or repr(key.strip())[1:-1] in line, (key, line)
    if key in FIELDS:
        assert key in line or key.split(".")[0] in line, (key, line)


@SETTINGS
@given(
    key=st.sampled_from(FIELDS), value=st.sampled_from(["[1, [2]]", "{x: {y: 1}}", "not a number!", "-1e400"])
)
def test_wrong_values_of_real_fields_name_the_field(capsys, key, value):
    rc, lines = dry_run(capsys, f"{key}={value}")
    if rc == 2:
        assert len(lines) == 1 and key in lines[0], lines


# ---- dataset rows ----
def good_row() -> st.SearchStrategy[dict]:
    text = st.text(min_size=1, max_size=20).filter(lambda s: s.strip())
    answer = st.one_of(text, st.integers(-1000, 1000), st.floats(-1e6, 1e6, allow_nan=False))
    return st.fixed_dictionaries(
        {"problem": text, "answer": answer}, optional={"source": st.text(max_size=5)}
    )


bad_rows = st.one_of(
    st.just(b"{not json"),
    st.just(b"[1, 2]"),  # JSON, not an object
    st.just(b'"text"'),
    st.just(b'{"problem": "caf\xe9", "answer": "1"}'),  # Latin-1, not UTF-8
    st.fixed_dictionaries({"answer": st.just("1")}),  # no problem
    st.fixed_dictionaries({"problem": st.just("1+1=")}),  # no answer
    st.fixed_dictionaries({"problem": st.just("   "), "answer": st.just("1")}),
    st.fixed_dictionaries({"problem": st.integers(), "answer": st.just("1")}),
    st.fixed_dictionaries(
        {"problem": st.just("x"), "answer": st.sampled_from([True, None, [], {}, "", " "])}
    ),
    st.fixed_dictionaries({"problem": st.just("x"), "answer": st.sampled_from([math.nan, math.inf])}),
)


def encode(row: dict | bytes) -> bytes:
    return row if isinstance(row, bytes) else json.dumps(row).encode()


@SETTINGS
@given(
    rows=st.lists(good_row(), min_size=0, max_size=8),
    bad=st.lists(st.tuples(st.integers(0, 8), bad_rows), max_size=2),
)
def test_dataset_rows_are_accepted_or_the_first_bad_one_is_named(capsys, rows, bad):
    lines: list[bytes] = [encode(r) for r in rows]
    for at, row in bad:
        lines.insert(min(at, len(lines)), encode(row))
    good = {encode(r) for r in rows}
    bad_at = {i for i, line in enumerate(lines) if line not in good}
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "rows.jsonl"
        path.write_bytes(b"\n".join(lines) + b"\n")
        rc, err = dry_run(capsys, f"data.path={path}")
    if not bad_at and rows:
        assert rc == 0, err
        return
    assert rc == 2 and len(err) == 1, err
    if not bad_at:  # no rows at all
        assert "no rows" in err[0]
    else:  # a bad row, by its number (the first bad one of its kind: unreadable rows before bad fields)
        named = re.search(r"line (\d+) of .*rows\.jsonl", err[0])  # as an editor counts: from 1
        assert named and int(named.group(1)) - 1 in bad_at, (sorted(bad_at), err)
