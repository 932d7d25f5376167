"""Stop strings in streamed text (serve/engines/stops.py)."""

from serve.engines.stops import emit_safe_len, find_stop


def test_find_stop_gives_the_earliest_stop():
    assert find_stop("a END b STOP", ["STOP", "END"]) == 2
    assert find_stop("nothing here", ["STOP", ""]) is None


def test_a_tail_that_may_begin_a_stop_string_or_a_half_character_is_held_back():
    assert emit_safe_len("Hello ST", ["STOP"]) == 6  # "ST" may be the start of STOP
    assert emit_safe_len("Hello", ["STOP"]) == 5
    assert emit_safe_len("caf\ufffd", []) == 3  # an incomplete UTF-8 character is never sent
