import pytest

from bertjob.text import cap_chars, clean_text, decode_text, parse_label, truncate_ids


def test_clean_text_removes_imdb_breaks_tags_and_entities():
    raw = "Great film!<br /><br />I &amp; my <i>friend</i>   loved it &quot;a lot&quot;.\n"
    assert clean_text(raw) == 'Great film! I & my friend loved it "a lot".'
    assert (
        clean_text(raw, strip_html=False)
        == "Great film!<br /><br />I &amp; my <i>friend</i> loved it &quot;a lot&quot;."
    )
    assert clean_text("  \n\t<br />  ") == ""


@pytest.mark.parametrize(
    "value, expected",
    [(0, 0), (1, 1), ("0", 0), ("1", 1), ("neg", 0), ("POS", 1), ("Negative", 0), (" positive ", 1),
     (True, 1), (1.0, 1), ("1.0", 1), (2, None), ("maybe", None), ("", None), (None, None)],
)  # fmt: skip
def test_parse_label(value, expected):
    assert parse_label(value) == expected


def test_decode_text_replaces_invalid_utf8_and_says_so():
    assert decode_text(b"ok") == ("ok", False)
    text, replaced = decode_text("café".encode("latin-1"))
    assert replaced and text == "caf\ufffd"


def test_truncate_head_tail_keeps_both_ends():
    ids = list(range(100))
    head_tail, cut = truncate_ids(ids, max_length=12, truncation="head+tail", head_tokens=4)
    assert cut and head_tail == [0, 1, 2, 3, 94, 95, 96, 97, 98, 99]
    assert truncate_ids(ids, 12, "head")[0] == list(range(10))
    assert truncate_ids(ids, 12, "tail")[0] == list(range(90, 100))
    assert truncate_ids(ids[:5], 12, "head+tail") == ([0, 1, 2, 3, 4], False)


def test_cap_chars_keeps_both_ends_of_huge_text():
    text = "a" * 1000 + "MIDDLE" + "z" * 1000
    capped, was = cap_chars(text, 100)
    assert was and capped.startswith("a" * 100) and capped.endswith("z" * 100) and "MIDDLE" not in capped
    assert cap_chars("short", 100) == ("short", False)
