"""OpenAI-compatible endpoints for the edited model.

    GET  /v1/models                 the served (base) model; the edit state as `kmd` metadata
    GET  /v1/models/{id}            the same, one model
    POST /v1/chat/completions       messages through the tokenizer's chat template
    POST /v1/completions            a plain prompt, as is

Everything goes through the edited model with per-row routing (`Editor.query` on the
prompt tokens, the same path as `/v1/generate`), under the lock that keeps generation off
a model half-way through an edit. `temperature` 0 is greedy; `stop` strings cut the text
(and are not returned); `stream: true` sends server-sent events (`data: {...}` chunks, then
`data: [DONE]`); `usage` counts prompt and completion tokens.

Auth and limits follow the rest of the API: reads (all of these) need the bearer token
only when `api.protect_reads` is set; `max_tokens` is bounded by `MAX_NEW_TOKENS`, the
prompt by the model's context, the body by `MAX_BODY_BYTES`. Errors, 4xx and 5xx alike,
come in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

Parameters kmd cannot honour (n > 1, penalties, logprobs, tools...) are refused with a
400 naming the parameter rather than silently ignored.

    errors.py      OpenAI-shaped errors, limits, the route class that answers in that shape
    bodies.py      the request bodies (strict; unsupported parameters refused by name)
    generation.py  the served model and its edit state; tokens from the edited model (the
                   seam with serving), then text with stop strings
    routes.py      `openai_router`
"""

from kmd.daemon.openai_api.errors import OpenAIError
from kmd.daemon.openai_api.generation import StopText, _QueueStreamer, edit_state, served_model_id, token_stream
from kmd.daemon.openai_api.routes import openai_router

__all__ = ["OpenAIError", "StopText", "_QueueStreamer", "edit_state", "openai_router", "served_model_id", "token_stream"]
