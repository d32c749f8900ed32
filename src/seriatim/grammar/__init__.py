"""Constrained generation: grammars that mask, at every step, the tokens that would break them (llguidance)."""
