"""The engine fixture runs a real vLLM engine, and greedy output is reproducible.

The two-engine test comes last: building its second engine retires the module's shared one.
"""

from __future__ import annotations

from conftest import PROMPTS, greedy
from kvbm.serving.vllm_settings import EngineSettings


def token_ids(llm, prompts, max_tokens=24):
    return [list(out.outputs[0].token_ids) for out in llm.generate(prompts, greedy(max_tokens))]


def test_prefix_cache_hit_gives_the_same_tokens(engine):
    prompt = "Hello world " * 40
    cold = engine.generate([prompt + "cold"], greedy())[0]
    warm = engine.generate([prompt + "cold"], greedy())[0]
    assert warm.num_cached_tokens > 0
    assert list(warm.outputs[0].token_ids) == list(cold.outputs[0].token_ids)


def test_one_by_one_equals_batched(engine):
    batched = token_ids(engine, PROMPTS)
    single = [token_ids(engine, [prompt])[0] for prompt in PROMPTS]
    assert single == batched


def test_two_engines_give_identical_greedy_tokens(engine, make_engine, tiny_model):
    first = token_ids(engine, PROMPTS)
    second = token_ids(make_engine(EngineSettings(model=tiny_model)), PROMPTS)
    assert all(len(tokens) == 24 for tokens in first)
    assert second == first
