"""Schemathesis against the live server's /openapi.json: generated requests, valid and invalid,
never get a 5xx. (Driven through `schema.as_strategy` and Hypothesis directly: schemathesis'
pytest integration (`from_fixture`/`parametrize`) fails on this pytest version.)"""

from __future__ import annotations

from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode

from support.live_server import LiveServer, tiny_config

EXAMPLES = 25  # per mode: about 50 requests in all


@pytest.fixture(scope="module")
def live(tiny_llama):
    # Small limits keep generated requests cheap: at most 8 tokens per choice and 8 choices.
    live = LiveServer(tiny_config(tiny_llama, max_tokens_cap=8, max_n=4, max_choices=8)).start()
    yield live
    live.stop()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_generated_requests_get_no_5xx(live, mode):
    schema = schemathesis.openapi.from_url(live.url + "/openapi.json")
    seen: Counter = Counter()

    @given(case=schema.as_strategy(mode))
    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    def run(case):
        response = case.call(base_url=live.url, timeout=30)
        seen[(case.operation.label, response.status_code)] += 1
        assert response.status_code < 500, (case.as_curl_command(), response.status_code, response.text)

    run()
    assert sum(seen.values()) >= EXAMPLES // 2
    assert len({op for op, _ in seen}) >= 3  # several operations were exercised
    assert live.state.llm.engine.has_unfinished() is False
