"""Request fields + per-model defaults -> the engine's SamplingParams."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from urllib.parse import quote

from server.engine.bans import Ban, BanList, check, compile_bans
from server.engine.sampling import DEFAULT_ORDER, STAGES
from server.engine.types import SamplingParams
from server.errors import BadRequestError
from server.protocol.common import TOKEN_ID, BannedString, SamplingFields
from server.registry.schema import SamplerDefaults

Tokenize = Callable[[str], list[int]]

# Parameters accepted on the wire that have no effect here; reported back to the caller.
IGNORED_KNOWN = ("provider", "user", "route")
# X-Hostler-Ignored-Params lists at most this many names, each at most this long.
MAX_IGNORED_NAMES = 32
MAX_NAME_CHARS = 64


def header_safe(name: str) -> str:
    """A field name as printable ASCII (percent-encoded), safe in an HTTP header value."""
    return quote(name[:MAX_NAME_CHARS], safe="!#$&'*+-.^_`|~:/()[]{}@=")


def ignored_params(request: SamplingFields) -> list[str]:
    """Unknown fields and known no-ops of this request, for X-Hostler-Ignored-Params."""
    names = sorted(header_safe(k) for k in (request.model_extra or {}))[:MAX_IGNORED_NAMES]
    for name in IGNORED_KNOWN:
        if getattr(request, name, None) is not None and name not in names:
            if name == "route" and request.models:
                continue
            names.append(name)
    return names


# Windows up to this many tokens are clamped to the context; longer ones are refused.
MAX_WINDOW = 1 << 20


def _window(request: SamplingFields, name: str, default: int, n_ctx: int) -> int:
    """A penalty window in tokens, at most the context; -1 is the whole context.

    llama.cpp allocates the window up front (2e9 would be gigabytes), so it never gets
    more than the context. A frontend's slider value beyond a small model's context
    (8192 on a 4096 model) means the whole context and is clamped; an absurd one is a 400.
    """
    value: int | None = getattr(request, name)
    if value is None:
        value = default
    if value == -1:
        return n_ctx
    if value > MAX_WINDOW:
        raise BadRequestError(
            f"{name}: {value} is far longer than any context; use -1 for the whole context",
            param=name,
        )
    return min(value, n_ctx)


def logit_bias(
    given: dict[str, float], n_vocab: int, tokenize: Tokenize
) -> tuple[dict[int, float], list[str]]:
    """Token ids -> bias, and the keys dropped (ids outside this vocabulary).

    A key that is text (not a token id) biases every token of the text as written and
    with a leading space (or without, if it has one): " Elara" and "Elara" are different
    tokens. An id key wins over the same token reached through text.
    """
    by_text: dict[int, float] = {}
    by_id: dict[int, float] = {}
    dropped: list[str] = []
    for key, value in given.items():
        bias = float("-inf") if value <= -100 else value
        if TOKEN_ID.fullmatch(key):
            token = int(key)
            if 0 <= token < n_vocab:
                by_id[token] = bias
            else:
                dropped.append(f"logit_bias[{token}]")
            continue
        variants = {key, key[1:] if key.startswith(" ") else " " + key} - {""}
        for variant in variants:
            for token in tokenize(variant):
                by_text[token] = bias
    return by_text | by_id, dropped


def banned_strings(
    request: Sequence[str | BannedString] | None, model: Sequence[Ban] = ()
) -> BanList | None:
    """The request's banned phrases plus its model's, compiled; a 400 if unusable."""
    bans = list(model)
    for entry in request or ():
        if isinstance(entry, str):
            if entry:
                bans.append(Ban(entry))
        elif entry.regex is not None:
            bans.append(Ban(entry.regex, regex=True, case_sensitive=entry.case_sensitive))
        elif entry.text is not None:
            bans.append(Ban(entry.text, case_sensitive=entry.case_sensitive))
    if not bans:
        return None
    unique = tuple(dict.fromkeys(bans))
    reason = check(unique)
    if reason is not None:
        raise BadRequestError(f"banned_strings: {reason}", param="banned_strings")
    return compile_bans(unique)


def to_sampling_params(
    request: SamplingFields,
    defaults: SamplerDefaults,
    n_vocab: int,
    n_ctx: int,
    grammar: str | None = None,
    tokenize: Tokenize | None = None,
) -> tuple[SamplingParams, list[str]]:
    """The engine's parameters, and what of the request was dropped (for the header).

    A `logit_bias` token id outside this model's vocabulary is dropped and reported as
    `logit_bias[<id>]`: frontends send presets made for other tokenizers (SillyTavern's
    "Anti-bond" sends tiktoken ids to every backend), and failing every reply for them
    helps no one. Values out of range are still a 400.
    """

    def pick(name: str, fallback: float) -> float:
        value = getattr(request, name)
        if value is None:
            value = getattr(defaults, name, None)
        return fallback if value is None else value

    bias, dropped = logit_bias(request.logit_bias or {}, n_vocab, tokenize or (lambda _text: []))
    order = None
    if request.sampler_order is not None:
        unknown = [s for s in request.sampler_order if s not in STAGES]
        if unknown:
            raise BadRequestError(
                f"sampler_order: {', '.join(unknown)} cannot be ordered; the stages are "
                + ", ".join(DEFAULT_ORDER)
                + " (logit bias, penalties and DRY have fixed places before them)",
                param="sampler_order",
            )
        order = tuple(request.sampler_order)
    params = SamplingParams(
        temperature=pick("temperature", 1.0),
        top_k=int(pick("top_k", 0)),
        top_p=pick("top_p", 1.0),
        min_p=pick("min_p", 0.0),
        top_a=pick("top_a", 0.0),
        typical_p=pick("typical_p", 1.0),
        top_n_sigma=pick("top_n_sigma", 0.0),
        repetition_penalty=pick("repetition_penalty", 1.0),
        frequency_penalty=pick("frequency_penalty", 0.0),
        presence_penalty=pick("presence_penalty", 0.0),
        penalty_last_n=_window(request, "repetition_penalty_range", 64, n_ctx),
        logit_bias=bias,
        seed=request.seed,
        dry_multiplier=request.dry_multiplier or 0.0,
        dry_base=request.dry_base if request.dry_base is not None else 1.75,
        dry_allowed_length=request.dry_allowed_length
        if request.dry_allowed_length is not None
        else 2,
        dry_penalty_last_n=_window(request, "dry_penalty_last_n", -1, n_ctx),
        dry_sequence_breakers=tuple(request.dry_sequence_breakers)
        if request.dry_sequence_breakers is not None
        else ("\n", ":", '"', "*"),
        xtc_threshold=request.xtc_threshold if request.xtc_threshold is not None else 0.1,
        xtc_probability=request.xtc_probability or 0.0,
        mirostat=request.mirostat_mode or 0,
        mirostat_tau=request.mirostat_tau if request.mirostat_tau is not None else 5.0,
        mirostat_eta=request.mirostat_eta if request.mirostat_eta is not None else 0.1,
        dynatemp_range=request.dynatemp_range or 0.0,
        dynatemp_exponent=request.dynatemp_exponent
        if request.dynatemp_exponent is not None
        else 1.0,
        tfs=pick("tfs", 1.0),
        smoothing_factor=pick("smoothing_factor", 0.0),
        smoothing_curve=pick("smoothing_curve", 1.0),
        adaptive_target=pick("adaptive_target", -1.0),
        adaptive_decay=pick("adaptive_decay", 0.9),
        min_tokens=request.min_tokens or 0,
        ignore_eos=bool(request.ignore_eos),
        top_logprobs=request.wanted_logprobs,
        grammar=grammar,
        sampler_order=order,
    )
    return params, dropped
