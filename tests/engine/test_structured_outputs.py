"""Structured outputs on a random toy model at temperature 1.0, where chance almost never gives a
valid output: every constrained output that ends with "stop" must be valid."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from lmbatch.engine import EngineConfig, LLMEngine, SamplingParams
from lmbatch.engine.structured_outputs import StructuredOutputsParams
from lmbatch.testing import build_toy_model

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                            "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
NUMBERS = {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 3}
REGEX = r"[a-z]{2,4}-[0-9]{2}"
CHOICE = ["positive", "negative", "neutral"]
CONSTRAINTS = [StructuredOutputsParams(json=PERSON), StructuredOutputsParams(json=json.dumps(NUMBERS)),
               StructuredOutputsParams(regex=REGEX), StructuredOutputsParams(choice=CHOICE),
               StructuredOutputsParams(json_object=True), None]


@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
    # Not decisive: a flat, random next-token distribution is the hard case for a constraint.
    return build_toy_model(tmp_path_factory.mktemp("so") / "llama", decisive=False, seed=3)


def _engine(model, **cfg) -> LLMEngine:
    return LLMEngine(EngineConfig(dtype="float32", model=str(model), **{"num_kv_blocks": 128, "max_num_seqs": 16,
                                                       "max_num_batched_tokens": 128, **cfg}))


def _valid(text: str, constraint: StructuredOutputsParams) -> bool:
    kind = constraint.kind
    if kind == "regex":
        return re.fullmatch(constraint.regex, text) is not None
    if kind == "choice":
        return text in constraint.choice
    try:
        value = json.loads(text)      # strict: raw control characters in strings are invalid
    except ValueError:
        return False
    if kind == "json_object":
        return isinstance(value, dict)
    try:
        jsonschema.validate(value, constraint.json)
    except jsonschema.ValidationError:
        return False
    return True


def _requests(n: int, max_tokens: int = 48):
    prompts = [("once upon a time " * (1 + i % 7)) + str(i) for i in range(n)]
    params = [SamplingParams(temperature=1.0, max_tokens=max_tokens, seed=i,
                             structured_outputs=CONSTRAINTS[i % len(CONSTRAINTS)]) for i in range(n)]
    return prompts, params


def test_every_finished_constrained_output_is_valid_under_chunking_and_preemption(random_model):
    # A small pool and token budget: long prompts are prefilled in chunks and sequences are
    # preempted and recomputed; a matcher must keep its state through both.
    engine = _engine(random_model, num_kv_blocks=24, max_num_batched_tokens=32)
    prompts, params = _requests(48)
    outs = engine.generate(prompts, params)
    assert engine.stats().preemptions > 0
    constrained = [(o, p.structured_outputs) for o, p in zip(outs, params) if p.structured_outputs]
    stopped = [(o, c) for o, c in constrained if o.finish_reason == "stop"]
    assert len(stopped) >= 0.7 * len(constrained)
    invalid = [(c.kind, o.text) for o, c in stopped if not _valid(o.text, c)]
    assert invalid == []
    # The unconstrained requests of the same batch, judged by the same rules, are not valid:
    # the test would see a mask that does nothing.
    free = [o.text for o, p in zip(outs, params) if p.structured_outputs is None]
    assert not any(_valid(t, CONSTRAINTS[0]) or _valid(t, CONSTRAINTS[2]) for t in free)


def test_greedy_and_seeded_constrained_outputs_do_not_depend_on_the_batch(random_model):
    prompts, params = _requests(12)
    greedy = [SamplingParams(temperature=0.0, max_tokens=32, structured_outputs=p.structured_outputs)
              for p in params]
    together = _engine(random_model).generate(prompts, params + [])
    alone = [_engine(random_model, max_num_seqs=1).generate([prompts[i]], [params[i]])[0] for i in (0, 2, 3)]
    assert [together[i].token_ids for i in (0, 2, 3)] == [o.token_ids for o in alone]
    first = _engine(random_model).generate(prompts, greedy)
    second = _engine(random_model, max_num_batched_tokens=16).generate(prompts, greedy)
    assert [o.token_ids for o in first] == [o.token_ids for o in second]


def test_a_constraint_that_cannot_finish_ends_with_length(random_model):
    long_regex = StructuredOutputsParams(regex="[a-z]{40}")
    (out,) = _engine(random_model).generate(["x"], [SamplingParams(temperature=1.0, max_tokens=5,
                                                                   structured_outputs=long_regex)])
    assert out.finish_reason == "length" and re.fullmatch("[a-z]*", out.text)


def test_a_bad_constraint_is_an_error_output_naming_it_and_the_others_run(random_model):
    engine = _engine(random_model)
    bad_regex = SamplingParams(max_tokens=8, structured_outputs=StructuredOutputsParams(regex="(unclosed"))
    bad_schema = SamplingParams(max_tokens=8, structured_outputs=StructuredOutputsParams(
        json={"type": "object", "properties": {"a": {"$ref": "#/nope"}}}))
    good = SamplingParams(max_tokens=8, temperature=1.0, structured_outputs=StructuredOutputsParams(choice=["ok"]))
    outs = engine.generate(["a", "b", "c"], [bad_regex, bad_schema, good])
    assert outs[0].finish_reason == "error" and outs[0].error.startswith("structured_outputs: regex")
    assert outs[1].finish_reason == "error" and outs[1].error.startswith("structured_outputs: json")
    assert outs[2].finish_reason == "stop" and outs[2].text == "ok"


def test_each_distinct_constraint_compiles_once(random_model):
    engine = _engine(random_model)
    prompts, params = _requests(30)
    engine.generate(prompts, params)
    assert engine.constraints.grammars.num_compiled == sum(c is not None for c in CONSTRAINTS)


def test_bad_params_are_refused_when_built():
    with pytest.raises(ValueError, match="exactly one of"):
        StructuredOutputsParams(regex="a", choice=["b"])
    with pytest.raises(ValueError, match="not valid JSON"):
        SamplingParams(structured_outputs={"json": "{oops"})
    assert SamplingParams(structured_outputs={"choice": ["a"]}).structured_outputs.kind == "choice"


@pytest.mark.parametrize("native", [True, False])
def test_the_bitmask_forbids_exactly_the_cleared_bits(native, monkeypatch):
    import torch

    from lmbatch.engine import cpu_kernels, grammar

    if not native:
        monkeypatch.setenv("LMBATCH_CPU_KERNELS", "0")
    elif cpu_kernels.load() is None:
        pytest.skip("no C++ compiler: the native kernel cannot be built here")
    g = torch.Generator().manual_seed(0)
    vocab, rows = 1000, [1, 4, 5]                      # vocab not a multiple of 32: a partial last word
    logits = torch.randn(6, vocab, generator=g)
    bitmask = torch.randint(-2**31, 2**31 - 1, (3, 32), generator=g, dtype=torch.int32)
    bitmask[1] = -1                                    # everything allowed
    out = grammar.apply_bitmask(logits.clone(), rows, bitmask)
    for k, r in enumerate(rows):
        allowed = [(int(bitmask[k, t // 32]) >> (t % 32)) & 1 for t in range(vocab)]
        expected = torch.tensor([x if a else float("-inf") for x, a in zip(logits[r].tolist(), allowed)])
        assert torch.equal(out[r], expected)
    untouched = [r for r in range(6) if r not in rows]
    assert torch.equal(out[untouched], logits[untouched])


def test_min_tokens_never_forces_a_token_the_grammar_forbids(random_model):
    # After "ok" only EOS may follow; min_tokens would suppress it: the constraint wins, and the
    # output is the complete choice, not a forbidden token.
    params = SamplingParams(temperature=1.0, seed=0, max_tokens=10, min_tokens=8,
                            structured_outputs=StructuredOutputsParams(choice=["ok"]))
    (out,) = _engine(random_model).generate(["x"], [params])
    assert out.finish_reason == "stop" and out.text == "ok"
