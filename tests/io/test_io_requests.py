"""Rows become engine requests (token ids + SamplingParams) or error rows with a reason."""

from __future__ import annotations

import pyarrow as pa
import pytest

from lmbatch import io

SPEC = io.InputSpec(path="unused", format="parquet", id_column="id", prompt_column="prompt",
                    sampling_columns={"mt": "max_tokens", "temp": "temperature", "n": "n"},
                    passthrough_columns=["tag"])


STRING = pa.string()


def _table(prompts, prompt_type=STRING, **cols):
    n = len(prompts)
    return pa.table({
        "id": list(range(n)), "prompt": pa.array(prompts, prompt_type),
        "mt": pa.array(cols.get("mt", [None] * n), pa.int64()),
        "temp": pa.array(cols.get("temp", [None] * n), pa.float64()),
        "n": pa.array(cols.get("n", [None] * n), pa.int64()),
        "tag": [f"t{i}" for i in range(n)],
    })


def test_text_prompts_are_batch_tokenized_with_defaults_and_row_overrides(tokenizer):
    texts = ["Hello there", "Ba ke lo", "What is 2+2?"]
    prep = io.prepare_requests(_table(texts, mt=[None, 7, None], temp=[0.5, None, None]), SPEC,
                               tokenizer, {"max_tokens": 4, "temperature": 0.0, "seed": 3}, 512)
    assert prep.errors == [None] * 3
    assert prep.prompt_ids == [tokenizer(t)["input_ids"] for t in texts]
    assert [s.max_tokens for s in prep.sampling] == [4, 7, 4]
    assert [s.temperature for s in prep.sampling] == [0.5, 0.0, 0.0]
    assert all(s.seed == 3 for s in prep.sampling)
    assert prep.input_columns.column_names == ["id", "tag"] and not prep.with_logprobs


def test_chat_messages_go_through_the_chat_template(tokenizer):
    msgs = [[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]]
    prep = io.prepare_requests(_table(msgs, pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
                               SPEC, tokenizer, {}, 512)
    text = tokenizer.apply_chat_template(msgs[0], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|assistant|>")
    assert prep.prompt_ids[0] == tokenizer(text, add_special_tokens=False)["input_ids"]


def test_token_id_prompts_pass_through(tokenizer):
    prep = io.prepare_requests(_table([[5, 6, 7], [8]], pa.list_(pa.int32())), SPEC, tokenizer, {}, 512)
    assert prep.prompt_ids == [[5, 6, 7], [8]] and prep.errors == [None, None]


def test_bad_rows_become_error_rows_and_never_raise(tokenizer):
    long_text = "ba " * 400
    prompts = ["ok", None, "", "   ", long_text, "bad temperature", "no samples", "fine too"]
    prep = io.prepare_requests(_table(prompts, temp=[None, None, None, None, None, -1.0, None, None],
                                      n=[None, None, None, None, None, None, 0, None]),
                               SPEC, tokenizer, {"max_tokens": 8}, 64)
    e = prep.errors
    assert e[0] is None and e[7] is None and prep.valid_rows == [0, 7]
    assert e[1] == e[2] == e[3] == "empty prompt"
    assert e[4].startswith("prompt too long:") and "max_model_len is 64" in e[4]
    assert "temperature must be >= 0" in e[5]
    assert "n must be >= 1" in e[6]
    assert all(prep.sampling[i] is None for i in range(1, 7))


def test_token_ids_outside_the_vocabulary_and_empty_messages(tokenizer):
    prep = io.prepare_requests(_table([[1, 2], [1, 10**7], []], pa.list_(pa.int64())), SPEC, tokenizer, {}, 512)
    assert prep.errors[0] is None
    assert "outside the vocabulary" in prep.errors[1] and prep.errors[2].startswith("empty prompt")


def test_max_tokens_is_capped_to_fit_the_model(tokenizer):
    prep = io.prepare_requests(_table(["Hello there"]), SPEC, tokenizer, {"max_tokens": 1000}, 32)
    assert prep.sampling[0].max_tokens == 32 - len(prep.prompt_ids[0])
    prep = io.prepare_requests(_table(["Hello there"]), SPEC, tokenizer, {"max_tokens": None, "logprobs": 2}, 32)
    assert prep.sampling[0].max_tokens == 32 - len(prep.prompt_ids[0]) and prep.with_logprobs


@pytest.mark.parametrize("kind", ["text", "messages"])
def test_a_tokenizer_without_chat_template_fails_only_message_rows(tokenizer, kind):
    import copy

    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    prompt = "hi" if kind == "text" else [{"role": "user", "content": "hi"}]
    ptype = pa.string() if kind == "text" else pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    prep = io.prepare_requests(_table([prompt], ptype), SPEC, plain, {}, 64)
    assert (prep.errors[0] is None) == (kind == "text")
    if kind == "messages":
        assert prep.errors[0].startswith("chat template failed")
