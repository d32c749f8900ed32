"""Scheduling: chunked prefill, admission by KV memory, aborts in every state, no leaks."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seriatim import SamplingParams
from seriatim.engine.config import EngineConfig
from seriatim.engine.engine import Engine

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def engine_for(llm, **config) -> Engine:
    return Engine(llm.model, llm.tokenizer, llm.device, torch.float32, EngineConfig(**config))


def prompt(n: int, seed: int = 0) -> list[int]:
    return torch.randint(3, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def run_all(engine: Engine, max_steps: int = 1000) -> dict[int, list[int]]:
    """Step until idle (bounded); the tokens each request received."""
    outputs: dict[int, list[int]] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished():
            break
        for delta, _ in engine.step():
            outputs.setdefault(delta.request_id, []).extend(delta.token_ids)
    return outputs


def assert_idle(engine: Engine) -> None:
    assert not engine.has_unfinished() and not engine.requests and not engine.scheduler.running
    blocks = engine.scheduler.blocks
    assert blocks.num_available == blocks.num_blocks and not any(blocks.ref_counts)


def test_chunked_prefill_keeps_decodes_flowing_and_outputs_exact(tiny_llm):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    engine = engine_for(tiny_llm, max_step_tokens=8)
    short = engine.add_request(prompt(5, 5), params)
    engine.step()  # the short prompt is prefilled and starts decoding
    long = engine.add_request(prompt(40, 40), params)
    outputs: dict[int, list[int]] = {short: [], long: []}
    per_step = []
    while engine.has_unfinished():
        got = {d.request_id: d.token_ids for d, _ in engine.step()}
        per_step.append(set(got))
        for rid, ids in got.items():
            outputs[rid] += ids
    first_long = next(i for i, ids in enumerate(per_step) if long in ids)
    assert first_long >= 5  # 40 prompt tokens through a budget of 8 shared with a decode
    assert all(short in ids for ids in per_step[:first_long])  # the decode never stalled
    assert outputs[long] == tiny_llm.generate(prompt(40, 40), params)[0].token_ids
    assert_idle(engine)


def test_waits_for_memory_then_runs_everything_once(tiny_llm):
    engine = engine_for(tiny_llm, kv_capacity_tokens=30)  # room for one 10+6 request at a time
    ids = [engine.add_request(prompt(10, i), GREEDY) for i in range(4)]
    assert len(engine.scheduler.waiting) == 4
    outputs = run_all(engine, max_steps=1)
    assert len(engine.scheduler.running) == 1 and len(engine.scheduler.waiting) == 3
    for rid, tokens in run_all(engine).items():
        outputs.setdefault(rid, []).extend(tokens)
    assert sorted(outputs) == ids and all(len(v) == 6 for v in outputs.values())
    for i, rid in enumerate(ids):
        assert outputs[rid] == tiny_llm.generate(prompt(10, i), GREEDY)[0].token_ids
    assert_idle(engine)


def test_request_that_can_never_fit_is_rejected(tiny_llm):
    engine = engine_for(tiny_llm, kv_capacity_tokens=20)
    try:
        engine.add_request(prompt(10), SamplingParams(max_tokens=50))
    except ValueError as e:
        assert "KV cache" in str(e)
    else:
        raise AssertionError("expected ValueError")
    assert_idle(engine)


def test_abort_in_every_state(tiny_llm):
    engine = engine_for(tiny_llm, max_running=2, max_step_tokens=8)
    decoding = engine.add_request(prompt(4, 1), GREEDY)
    engine.step()
    prefilling = engine.add_request(prompt(30, 2), GREEDY)
    waiting = engine.add_request(prompt(4, 3), GREEDY)
    engine.step()
    assert engine.requests[prefilling].num_cached < 30 and not engine.requests[waiting].block_table.blocks
    for rid in (waiting, prefilling, decoding):
        assert engine.abort(rid).finish_reason == "abort"
    assert engine.abort(decoding) is None  # twice is harmless
    assert_idle(engine)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(["add", "abort", "step"]), st.integers(1, 25)), max_size=30))
def test_random_add_abort_step_leaks_nothing(tiny_llm, ops):
    engine = engine_for(tiny_llm, max_running=3, max_step_tokens=16, kv_capacity_tokens=80)
    live: list[int] = []
    for op, n in ops:
        if op == "add":
            live.append(engine.add_request(prompt(n, n), SamplingParams(temperature=0.8, seed=n, max_tokens=4)))
        elif op == "abort" and live:
            engine.abort(live.pop(n % len(live)))
        else:
            engine.step()
    finished = run_all(engine)
    assert set(finished) <= set(range(len(ops) + 1))
    assert_idle(engine)


def test_shared_prefix_is_computed_once_and_outputs_unchanged(tiny_llm):
    system = prompt(96, 99)
    users = [system + prompt(5, i) for i in range(8)]
    alone = [tiny_llm.generate(u, GREEDY)[0].token_ids for u in users]
    engine = engine_for(tiny_llm, block_size=16)
    first = engine.add_request(users[0], GREEDY)
    outputs = run_all(engine)
    ids = [engine.add_request(u, GREEDY) for u in users[1:]]
    outputs.update(run_all(engine))
    assert [outputs[i] for i in [first, *ids]] == alone
    blocks = engine.scheduler.blocks
    # 96 shared tokens = 6 full blocks reused by each of the 7 later requests.
    assert blocks.stats.hit_tokens == 7 * 96
    assert engine.stats.prompt_tokens == 101 + 7 * 5
    assert_idle(engine)


def test_preemption_recomputes_and_keeps_outputs(tiny_llm):
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    prompts = [prompt(6, i) for i in range(4)]
    alone = [tiny_llm.generate(p, params)[0].token_ids for p in prompts]
    # 8 blocks of 4 positions: each request grows to 26 positions (7 blocks), so they cannot all run.
    engine = engine_for(tiny_llm, block_size=4, kv_capacity_tokens=32)
    ids = [engine.add_request(p, params) for p in prompts]
    outputs = run_all(engine)
    assert engine.scheduler.preemptions > 0
    assert [outputs[i] for i in ids] == alone
    assert_idle(engine)


def test_seeded_sampling_is_independent_of_batch_and_preemption(tiny_llm):
    params = [SamplingParams(temperature=1.0, top_k=20, seed=s, max_tokens=12, ignore_eos=True) for s in range(4)]
    prompts = [prompt(6, 10 + i) for i in range(4)]
    alone = [tiny_llm.generate(p, sp)[0].token_ids for p, sp in zip(prompts, params)]
    engine = engine_for(tiny_llm, block_size=4, kv_capacity_tokens=24)
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    outputs = run_all(engine)
    assert [outputs[i] for i in ids] == alone
    assert_idle(engine)


def test_hit_rate_counts_each_admission_once(tiny_llm):
    """A request waiting for memory looks its prefix up again every step; only its admission counts."""
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    engine = engine_for(tiny_llm, block_size=4, kv_capacity_tokens=24)  # room for one 20-position request
    first, second = (engine.add_request(prompt(16, seed), params) for seed in (1, 2))
    steps = []
    while engine.has_unfinished():
        steps.append({d.request_id for d, _ in engine.step()})
    assert steps.index({second}) > steps.index({first}) + 2  # it waited several steps
    stats = engine.scheduler.blocks.stats
    assert engine.scheduler.preemptions == 0 and (stats.queried_tokens, stats.hit_tokens) == (32, 0)
    assert_idle(engine)


def test_prefix_caching_can_be_disabled(tiny_llm):
    engine = engine_for(tiny_llm, block_size=16, prefix_caching=False)
    for _ in range(2):
        engine.add_request(prompt(40, 1), GREEDY)
        run_all(engine)
    assert engine.scheduler.blocks.stats.hit_tokens == 0 and engine.stats.prompt_tokens == 80


def test_truncated_cache_is_recomputed_in_one_multi_token_step(tiny_llm):
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    expected = tiny_llm.generate(prompt(7, 3), params)[0].token_ids
    engine = engine_for(tiny_llm, block_size=4)
    rid = engine.add_request(prompt(7, 3), params)
    outputs = run_all(engine, max_steps=8)
    seq = engine.requests[rid]
    engine.scheduler.truncate(seq, seq.num_cached - 5)  # as if 5 speculative tokens were rejected
    assert seq.pending_tokens() == seq.all_tokens()[-6:]
    chunks = engine.scheduler.schedule()  # only reserves blocks: step() will schedule the same
    assert [(c.seq.request_id, c.length) for c in chunks] == [(rid, 6)]
    for rid_, tokens in run_all(engine).items():
        outputs.setdefault(rid_, []).extend(tokens)
    assert outputs[rid] == expected
    assert_idle(engine)


def test_deterministic_mode_is_batch_invariant_in_the_fast_path(tiny_llama):
    from seriatim import LLM

    llm = LLM(str(tiny_llama[0] / "Q4_1.gguf"), deterministic=True, max_step_tokens=8)
    params = [SamplingParams(temperature=0.7, seed=s, max_tokens=10, ignore_eos=True) for s in range(3)]
    prompts = [prompt(n, n) for n in (5, 19, 11)]
    alone = [llm.generate(p, sp)[0].token_ids for p, sp in zip(prompts, params)]
    ids = [llm.add_request(p, sp) for p, sp in zip(prompts, params)]
    outputs = run_all(llm.engine)
    assert [outputs[i] for i in ids] == alone
    assert_idle(llm.engine)


def test_step_budget_defaults_by_device(tiny_llama):
    """512 tokens a step on a CPU (prefill bound by arithmetic), unless asked otherwise; CUDA's 4096 is in
    test_cuda.py."""
    from seriatim import LLM

    path = str(tiny_llama[0] / "Q4_1.gguf")
    assert LLM(path, device="cpu").engine.scheduler.config.max_step_tokens == 512
    assert LLM(path, device="cpu", max_step_tokens=64).engine.scheduler.config.max_step_tokens == 64
