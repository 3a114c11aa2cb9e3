"""The query language: what each expression means, what is refused, and fuzzing that only BadInput escapes."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clipsearch.errors import BadInput
from clipsearch.query_syntax import Part, Query, parse_parts


@pytest.mark.parametrize("expression,parts", [
    ("kids on a beach at sunset", [Part("text", "kids on a beach at sunset")]),
    ('2*dog + beach.jpg - "cat"', [Part("text", "dog", 2.0), Part("image", "beach.jpg"), Part("text", "cat", -1.0)]),
    ("#42 - 0.5*'blurry photo'", [Part("image", 42), Part("text", "blurry photo", -0.5)]),
    ("- cat + dog", [Part("text", "cat", -1.0), Part("text", "dog")]),
    ("t-shirt - red", [Part("text", "t-shirt"), Part("text", "red", -1.0)]),
    ('"rock - paper + scissors"', [Part("text", "rock - paper + scissors")]),
    ('"beach.jpg"', [Part("text", "beach.jpg")]),
    ("the '90s", [Part("text", "the '90s")]),
    ("rock 'n' roll", [Part("text", "rock 'n' roll")]),
    ("1.5 * ~/Photos/my trip.JPG", [Part("image", "~/Photos/my trip.JPG", 1.5)]),
    ("3x zoom", [Part("text", "3x zoom")]),
])
def test_meaning(expression, parts):
    assert parse_parts(expression) == parts


@pytest.mark.parametrize("expression,message", [
    ("", "empty"),
    ("   ", "empty"),
    ("dog + + cat", "nothing between"),
    ("dog -", "ends with '-'"),
    ("x*dog", "bad weight 'x'"),
    ("0*dog", "more than 0"),
    ("2*", "weighs nothing"),
    ('"dog"cat', "after the quoted part"),
    ('""', "quoted part of the query is empty"),
])
def test_refused_with_a_message(expression, message):
    with pytest.raises(BadInput, match=message):
        parse_parts(expression)


def test_build_adds_images_and_negatives_like_the_cli_flags():
    query = Query.build("dog", image=["beach.jpg", 7], not_=["cat", "#3", "2*rain.png"])
    assert query.parts == (Part("text", "dog"), Part("image", "beach.jpg"), Part("image", 7),
                           Part("text", "cat", -1.0), Part("image", 3, -1.0), Part("image", "rain.png", -2.0))
    assert Query.build(Query.parse("dog"), image=["a.png"]).parts == (Part("text", "dog"), Part("image", "a.png"))


def test_build_refuses_empty_and_only_negative_queries():
    with pytest.raises(BadInput, match="empty"):
        Query.build("")
    with pytest.raises(BadInput, match="at least one part to look for"):
        Query.build("- cat")
    with pytest.raises(BadInput, match="one part"):
        Query.build("dog", not_=["cat + rain"])


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab *+-\"'#.0123456789jpg~/ \t")), max_size=30) | st.text(max_size=30))
def test_fuzz_only_bad_input_escapes(expression):
    try:
        parts = parse_parts(expression)
    except BadInput:
        return
    assert parts
    for part in parts:
        assert part.kind in ("text", "image") and part.weight != 0
        if part.kind == "text":
            assert part.value and part.value == part.value.strip()
