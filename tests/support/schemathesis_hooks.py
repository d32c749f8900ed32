"""What schemathesis generates for the OpenAPI document's own `format: "grammar"` (server/schemas.py):
grammars in llguidance's Lark syntax, as a client would write them: a start rule of alternatives, each a
sequence of quoted literals and regexes, some repeated. (No tests here; the schemathesis test loads this
module through SCHEMATHESIS_HOOKS.)"""

from __future__ import annotations

import json
import operator

import schemathesis
from hypothesis import strategies as st

_TERMINAL = st.text(min_size=1, max_size=8).map(json.dumps) | st.sampled_from(["/[a-z]+/", "/[0-9]{1,3}/", "/ +/"])
_ITEM = st.builds(operator.add, _TERMINAL, st.sampled_from(["", "?", "*", "+"]))
_ALTERNATIVE = st.lists(_ITEM, min_size=1, max_size=4).map(" ".join)
GRAMMARS = st.lists(_ALTERNATIVE, min_size=1, max_size=3).map(lambda alternatives: "start: " + " | ".join(alternatives))

schemathesis.openapi.format("grammar", GRAMMARS)
