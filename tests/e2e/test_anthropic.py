"""/v1/messages on the real engine, through the official anthropic SDK."""

from __future__ import annotations

from collections.abc import Iterator

import anthropic
import pytest

pytestmark = pytest.mark.e2e

HI = [{"role": "user", "content": "Name three colours."}]
SYSTEM = "You are a helpful assistant who answers briefly. " * 20  # a prefix worth caching


@pytest.fixture
def claude(server_url: str) -> Iterator[anthropic.Anthropic]:
    # Closed after each test: a pooled socket left to the garbage collector is a
    # ResourceWarning in whichever later test it is collected in.
    with anthropic.Anthropic(
        base_url=server_url, api_key="unused", max_retries=0, timeout=120
    ) as client:
        yield client


def test_text_streamed_and_not(claude: anthropic.Anthropic) -> None:
    body = {"model": "smollm2-135m", "max_tokens": 24, "messages": HI,
            "extra_body": {"temperature": 0}}  # fmt: skip
    plain = claude.messages.create(**body)  # type: ignore[arg-type]
    with claude.messages.stream(**body) as s:  # type: ignore[arg-type]
        texts = [t for t in s.text_stream]
        streamed = s.get_final_message()
    assert plain.content and plain.content[0].type == "text"
    assert "".join(texts) == plain.content[0].text == streamed.content[0].text  # type: ignore[union-attr]
    assert plain.stop_reason in ("end_turn", "max_tokens")
    assert streamed.usage.output_tokens == plain.usage.output_tokens > 0


def test_cache_usage_on_a_repeated_prompt(claude: anthropic.Anthropic) -> None:
    body = {"model": "claude-sonnet-4-5", "max_tokens": 8, "system": SYSTEM, "messages": HI}
    count = claude.messages.count_tokens(model="smollm2-135m", system=SYSTEM, messages=HI)
    first = claude.messages.create(**body)  # type: ignore[arg-type]
    second = claude.messages.create(**body)  # type: ignore[arg-type]
    assert first.model == "smollm2-135m"  # claude-* names mean the default model
    u1, u2 = first.usage, second.usage
    assert u1.input_tokens + (u1.cache_read_input_tokens or 0) == count.input_tokens
    assert u2.input_tokens + (u2.cache_read_input_tokens or 0) == count.input_tokens
    assert (u2.cache_read_input_tokens or 0) >= count.input_tokens - 2
    assert u2.input_tokens < 5


def test_tool_round_trip(claude: anthropic.Anthropic) -> None:
    tool = {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "input_schema": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    }
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    m = claude.messages.create(
        model="smollm2-135m", max_tokens=60, messages=msgs, tools=[tool],  # type: ignore[list-item]
        tool_choice={"type": "tool", "name": "get_weather"},
    )  # fmt: skip
    assert m.stop_reason == "tool_use"
    call = next(b for b in m.content if b.type == "tool_use")
    assert call.name == "get_weather" and isinstance(call.input["city"], str)  # type: ignore[index]
    msgs += [
        {"role": "assistant", "content": [call.model_dump(exclude_none=True)]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                      "content": "Sunny, 21 C"}]},
    ]  # fmt: skip
    with claude.messages.stream(
        model="smollm2-135m",
        max_tokens=30,
        messages=msgs,
        tools=[tool],  # type: ignore[arg-type]
    ) as s:
        final = s.get_final_message()
    assert final.stop_reason in ("end_turn", "max_tokens", "tool_use")
    assert final.content


def test_errors(claude: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError):
        claude.messages.create(model="no-such-model", max_tokens=5, messages=HI)  # type: ignore[arg-type]
    with pytest.raises(anthropic.BadRequestError) as err:
        claude.messages.create(
            model="smollm2-135m", max_tokens=5,
            messages=[{"role": "user", "content": "word " * 9000}],
        )  # fmt: skip
    assert "prompt is too long" in str(err.value)
