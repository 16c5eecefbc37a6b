"""GET /metrics (Prometheus) and GET /v1/loads (SGLang's load report, which SMG polls):
what a router or scraper reads, behind the metrics key (`--metrics-key`) or any API key."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Depends, Request, Response

from server.api.deps import ModelsDep, require_metrics_key
from server.api.metrics import CONTENT_TYPE, Metrics, load_of

router = APIRouter(dependencies=[Depends(require_metrics_key)], include_in_schema=False)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    registry: Metrics = request.app.state.metrics
    return Response(registry.render(), media_type=CONTENT_TYPE)


@router.get("/v1/loads")
async def loads(request: Request, models: ModelsDep) -> dict[str, Any]:
    """The chat models' load as one data-parallel rank, in the shape SGLang's `/v1/loads`
    has: SMG's load-aware policies (and its cache_aware balance) read it from any worker
    that is not vLLM or SGLang. Every `include` section but `core` is absent."""
    registry: Metrics = request.app.state.metrics
    running = waiting = slots = used = capacity = 0
    tok_s = 0.0
    for engine in models.pool.loaded.values():
        h = engine.health()
        if h.get("pooling"):
            continue  # an embedding model holds no chat's cache
        load = load_of(h)
        running += load.running
        waiting += load.waiting
        slots += load.slots
        used += load.kv_tokens
        capacity += load.kv_capacity
        tok_s += load.tok_s
    queries = sum(p.queries for p in registry.prefix.values())
    hits = sum(p.hits for p in registry.prefix.values())
    return {
        "timestamp": datetime.now(UTC).isoformat(),
        "dp_rank_count": 1,
        "loads": [
            {
                "dp_rank": 0,
                "num_running_reqs": running,
                "num_waiting_reqs": waiting,
                "num_total_reqs": running + waiting,
                "num_used_tokens": used,
                "max_total_num_tokens": capacity,
                "token_usage": used / capacity if capacity else 0.0,
                "gen_throughput": round(tok_s, 1),
                "cache_hit_rate": hits / queries if queries else 0.0,
                "utilization": running / slots if slots else 0.0,
                "max_running_requests": slots,
            }
        ],
    }
