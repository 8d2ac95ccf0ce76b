"""Caption cleanup: what a scraped caption turns into, the limits always hold, and big inputs stay fast."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from components.config import CaptionConfig
from components.curate.captions import CHANGES, clean_caption, tagger_caption

CONFIG = CaptionConfig()


@pytest.mark.parametrize(
    ("raw", "text", "changes"),
    [
        (None, None, ()),
        ("A red apple.", "A red apple.", ()),
        ('  "A <b>red</b> apple &amp; a pear"  ', "A red apple & a pear", ("html_stripped", "whitespace", "quotes_stripped")),
        ("&lt;p&gt;A dog&lt;/p&gt;", "A dog", ("html_stripped", "whitespace")),
        ("Photo of a cat https://example.com/a?b=1 www.cats.org", "Photo of a cat", ("url_removed", "whitespace")),
        ("caf\ufffd au lait", "caf au lait", ("replacement_chars",)),
        ("a\x00 cat\tsleeping\u200b\n", "a cat sleeping", ("control_chars", "whitespace")),
        ("x < y and z > w", "x < y and z > w", ()),
        ("12345 !!!", None, ("no_text",)),
        ("<br/> &nbsp; ", None, ("html_stripped", "whitespace", "no_text")),
        ("", None, ("no_text",)),
    ],
)
def test_examples(raw: str | None, text: str | None, changes: tuple[str, ...]) -> None:
    result = clean_caption(raw, CONFIG)
    assert result.text == text
    assert result.changes == changes


def test_truncation_cuts_at_a_word_boundary() -> None:
    config = CaptionConfig(max_chars=20, max_words=4)
    assert clean_caption("one two three four five six", config).text == "one two three four"
    assert clean_caption("one two three four five six", config).changes == ("truncated_words",)
    cut = clean_caption("alpha beta gamma delta", config)
    assert cut.text == "alpha beta gamma" and cut.changes == ("truncated_chars",)
    assert clean_caption("x" * 50, config).text == "x" * 20  # one giant word: cut mid-word


def test_a_megabyte_caption_is_cleaned_quickly() -> None:
    """Linear time: pathological megabyte inputs (unclosed tags, brackets, entities, one long word) in well under a second."""
    for raw in ["<a" + "a" * 1_000_000, "<" * 1_000_000, "&" * 1_000_000, "word \t" * 200_000, "http://" * 150_000, "\x00" * 1_000_000]:
        start = time.perf_counter()
        result = clean_caption(raw, CONFIG)
        assert time.perf_counter() - start < 1.0, raw[:10]
        assert result.text is None or len(result.text) <= CONFIG.max_chars


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=2000), st.integers(1, 400), st.integers(1, 80))
def test_never_raises_and_respects_the_limits(raw: str, max_chars: int, max_words: int) -> None:
    config = CaptionConfig(max_chars=max_chars, max_words=max_words)
    result = clean_caption(raw, config)
    assert set(result.changes) <= set(CHANGES)
    if result.text is None:
        return
    assert 0 < len(result.text) <= max_chars
    assert len(result.text.split(" ")) <= max_words
    assert result.text == result.text.strip() and "  " not in result.text
    assert "\ufffd" not in result.text
    assert any(ch.isalpha() for ch in result.text)
    assert all(ch == " " or not ch.isspace() for ch in result.text)
    result.text.encode("utf-8")  # writable to Parquet: no lone surrogates


def test_tagger_caption_template() -> None:
    assert tagger_caption(["golden retriever", "tennis ball"]) == "a golden retriever, tennis ball"
    assert tagger_caption(["orange", ""]) == "an orange"
    with pytest.raises(ValueError, match="label"):
        tagger_caption([])
