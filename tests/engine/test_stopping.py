"""Stop strings: matched across token boundaries, never emitted, not even partially."""

from __future__ import annotations

import pytest

from seriatim.engine.stopping import StopStringFilter


def feed(stops, pieces):
    f = StopStringFilter(stops)
    out = []
    for p in pieces:
        out.append(f.push(p))
        if f.stopped:
            break
    if not f.stopped:
        out.append(f.flush())
    return out, f.stopped


def test_stop_split_over_pieces_is_dropped_and_never_leaks():
    out, stopped = feed(("END",), ["hello E", "N", "D tail"])
    assert stopped and "".join(out) == "hello "
    assert all("E" not in o for o in out)  # the held-back "E", "EN" never surfaced


def test_false_start_is_released():
    out, stopped = feed(("END",), ["hello EN", "X more"])
    assert not stopped and "".join(out) == "hello ENX more"
    assert out[0] == "hello "  # "EN" held until it could no longer match


def test_earliest_of_several_stops_wins():
    out, stopped = feed(("world", "lo w"), ["hel", "lo world"])
    assert stopped and "".join(out) == "hel"


@pytest.mark.parametrize("stops", [None, ()])
def test_no_stops_passes_through(stops):
    out, stopped = feed(stops, ["a", "b"])
    assert out[:2] == ["a", "b"] and not stopped


def test_the_held_back_prefix_is_the_longest_suffix_that_begins_a_stop():
    import random

    from seriatim.engine.stopping import held_prefix

    def by_definition(text: str, stop: str) -> int:
        return max((k for k in range(min(len(stop) - 1, len(text)) + 1) if text.endswith(stop[:k])), default=0)

    rng = random.Random(0)
    for _ in range(3000):
        text = "".join(rng.choice("ab") for _ in range(rng.randint(0, 12)))
        stop = "".join(rng.choice("ab") for _ in range(rng.randint(1, 8)))
        assert held_prefix(text, stop) == by_definition(text, stop), (text, stop)
