"""OpenAI-compatible endpoints for the edited model.

    GET  /v1/models                 the served (base) model; the edit state as `kmd` metadata
    GET  /v1/models/{id}            the same, one model
    POST /v1/chat/completions       messages through the tokenizer's chat template
    POST /v1/completions            a plain prompt, as is

Everything goes through the serving engine (`kmd.daemon.serving`, the same path as
`/v1/generate` and the console): the committed edits' snapshot, each row routed on its own
prompt tokens, batched with every other request and never waiting for an edit.
`temperature` 0 is greedy; `stop` strings cut the text (and are not returned); `stream:
true` sends server-sent events (`data: {...}` chunks, then `data: [DONE]`); `usage` counts
prompt and completion tokens; `system_fingerprint` names the state that answered.

Auth and limits follow the rest of the API: reads (all of these) need the bearer token
only when `api.protect_reads` is set; each caller (with or without the token) has its
generation budget (429 with Retry-After when spent); `max_tokens` is bounded by the
caller's budget, the prompt by the model's context, the body by `MAX_BODY_BYTES`. Errors,
4xx and 5xx alike, come in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

Parameters kmd cannot honour (n > 1, penalties, logprobs, tools...) are refused with a
400 naming the parameter rather than silently ignored.

    errors.py      OpenAI-shaped errors, limits, the route class that answers in that shape
    bodies.py      the request bodies (strict; unsupported parameters refused by name)
    generation.py  the served model and its edit state; a request to the serving engine,
                   then its text with stop strings
    routes.py      `openai_router`
"""

from kmd.daemon.openai_api.errors import OpenAIError
from kmd.daemon.openai_api.generation import StopText, edit_state, served_model_id
from kmd.daemon.openai_api.routes import openai_router

__all__ = ["OpenAIError", "StopText", "edit_state", "openai_router", "served_model_id"]
