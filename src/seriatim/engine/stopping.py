"""Stop strings over a stream of text deltas.

A stop string may be split over several tokens, so text that could be the
start of one is held back until it either completes the stop string (and is
dropped) or can no longer match (and is released).
"""

from __future__ import annotations


class StopStringFilter:
    def __init__(self, stops: tuple[str, ...] | None):
        self.stops = stops or ()
        self.pending = ""  # text received but not yet released
        self.stopped = False

    def push(self, delta: str) -> str:
        """Feed newly decoded text; return what is safe to emit. Sets `stopped` on a match."""
        if not self.stops:
            return delta
        self.pending += delta
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[: min(hits)], ""
            return out
        keep = self._partial_match_len()
        cut = len(self.pending) - keep
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out

    def flush(self) -> str:
        """Release held-back text when generation ends for another reason."""
        out, self.pending = self.pending, ""
        return out

    def _partial_match_len(self) -> int:
        """Length of the longest suffix of `pending` that is a proper prefix of a stop string."""
        return max((held_prefix(self.pending, s) for s in self.stops), default=0)


def held_prefix(text: str, stop: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `stop`. Only suffixes that start
    with stop's first character can be one, so the scan visits those alone, longest first: a token's cost
    stays near one pass over the stop strings, however many and long they are."""
    n = len(text)
    i = text.find(stop[0], max(0, n - len(stop) + 1))
    while i != -1:
        if stop.startswith(text[i:]):
            return n - i
        i = text.find(stop[0], i + 1)
    return 0
