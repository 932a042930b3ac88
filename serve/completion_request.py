"""OpenAI (legacy) text-completion requests: a parsed body in, a validated :class:`~serve.openai_request.Parsed` out.

Contract: :func:`validate_completion` checks a body already through :func:`~serve.openai_request.parse_body`
(every number finite, every string text) against OpenAI's ``/v1/completions`` schema and this server's
limits: ``prompt`` is a string, an array of token ids, an array of strings or an array of arrays of token
ids (each prompt non-empty, ids in the vocabulary); a string is encoded as text (never as control tokens,
``tok.literal``), with no template. ``max_tokens`` defaults to 16 (OpenAI's default) and may be 0 (with
``echo``: scoring only); ``logprobs`` is an integer in [0, MAX_LOGPROBS] (the alternatives per token;
``null`` for none); ``echo`` sends the prompt first. ``best_of`` (other than 1), ``suffix``, ``logit_bias`` and
non-zero presence/frequency penalties are refused. Every refusal is an :class:`~serve.openai_request.APIError`
400 with ``param``; n times the number of prompts is at most ``MAX_CHOICES``. Pure: no web framework.
"""

from __future__ import annotations

import secrets

from core.chat_template import TEXT, Piece
from core.tokenizer import encode_documents
from serve.engine import Engine, Sampling
from serve.openai_request import (
    MAX_CHOICES,
    APIError,
    Parsed,
    answer_budget,
    flag_field,
    integer_field,
    parse_options,
    refuse_penalties_and_check_model,
    show_value,
)

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions
MAX_LOGPROBS = 5  # OpenAI's limit for completions' logprobs


def _is_ids(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in value)


def parse_prompts(engine: Engine, body: dict) -> list[list[int]]:
    """The prompts' ids; each must be non-empty, each id in the vocabulary."""
    prompt = body.get("prompt")
    if prompt is None:
        raise APIError(400, "'prompt' is required", "prompt", "missing_required_parameter")
    if isinstance(prompt, str) or (_is_ids(prompt) and prompt):
        prompts, where = [prompt], ["prompt"]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or _is_ids(p) for p in prompt):
        prompts, where = prompt, [f"prompt[{i}]" for i in range(len(prompt))]
    else:
        raise APIError(400, "'prompt' must be a string, an array of token ids, an array of strings or an array of "
                       "arrays of token ids", "prompt", "invalid_type")
    if len(prompts) > MAX_CHOICES:
        raise APIError(400, f"'prompt' holds {len(prompts)} prompts; at most {MAX_CHOICES} per request", "prompt",
                       "invalid_value")
    vocab = engine.tokenizer.tokenizer.get_vocab_size(with_added_tokens=True)
    texts = [i for i, p in enumerate(prompts) if isinstance(p, str)]
    ids: list[list[int]] = [p if isinstance(p, list) else [] for p in prompts]
    for i in texts:
        if engine.max_token_bytes is not None and -(-len(prompts[i].encode("utf-8")) // engine.max_token_bytes) > \
                engine.context:
            raise APIError(400, f"'{where[i]}' cannot fit this model's {engine.context}-token context", where[i],
                           "context_length_exceeded")
    if texts:
        docs = [[Piece(prompts[i], TEXT, False)] for i in texts]
        try:
            encoded = encode_documents(engine.tokenizer, docs)
        except Exception as e:  # TextRefused: text the tokenizer cannot encode
            reason = " ".join(str(e).split())[:200]
            raise APIError(400, f"the tokenizer refused the prompt ({reason})", "prompt", "invalid_value") from None
        flat, start = encoded.ids.tolist(), 0
        for i, n in zip(texts, encoded.doc_lens.tolist(), strict=True):
            ids[i], start = flat[start:start + n], start + n
    for i, p in enumerate(ids):
        if not p:
            raise APIError(400, f"'{where[i]}' is empty", where[i], "invalid_value")
        bad = next((x for x in p if not 0 <= x < vocab), None)
        if bad is not None:
            raise APIError(400, f"'{where[i]}' holds the token id {show_value(bad)}, outside this model's "
                           f"vocabulary of {vocab}", where[i], "invalid_value")
        if len(p) > engine.context:
            raise APIError(400, f"'{where[i]}' is {len(p)} tokens; this model's context is {engine.context} tokens",
                           where[i], "context_length_exceeded")
    return ids


def refuse_unsupported_completion(body: dict) -> None:
    """400 for the completion fields this server does not implement (when they ask for something)."""
    best_of = integer_field(body, "best_of", 1, MAX_CHOICES)
    if best_of not in (None, 1):
        raise APIError(400, "'best_of' is not supported (only 1)", "best_of", "unsupported_parameter")
    for name in ("suffix", "logit_bias"):
        if body.get(name) not in (None, "", {}):
            raise APIError(400, f"'{name}' is not supported by this server", name, "unsupported_parameter")
    refuse_penalties_and_check_model(body)


def validate_completion(engine: Engine, body: dict) -> Parsed:
    """The validated text-completion request of a parsed body, or an APIError naming the param."""
    refuse_unsupported_completion(body)
    o = parse_options(body)
    logprobs = integer_field(body, "logprobs", 0, MAX_LOGPROBS)
    echo = flag_field(body, "echo")
    asked = integer_field(body, "max_tokens", 0)
    prompts = parse_prompts(engine, body)
    if len(prompts) * o.n > MAX_CHOICES:
        raise APIError(400, f"n={o.n} for {len(prompts)} prompts asks for {len(prompts) * o.n} choices; at most "
                       f"{MAX_CHOICES} per request", "n", "invalid_value")
    seed = secrets.randbits(63) if o.seed is None else o.seed
    samplings = []
    for ids in prompts:
        budget = answer_budget(asked, DEFAULT_MAX_TOKENS, engine.context - len(ids), len(ids), engine.context,
                               "max_tokens")
        samplings.append(Sampling(ids, budget, o.temperature, o.top_p, o.top_k, o.repetition_penalty, o.stop, seed,
                                  logprobs=logprobs, echo=echo, raw=True))
    return Parsed(samplings, o.n, o.stream, o.include_usage)
