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
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.pending)), best, -1):
                if self.pending.endswith(s[:k]):
                    best = k
                    break
        return best
