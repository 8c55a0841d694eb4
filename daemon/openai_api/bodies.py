"""The request bodies of the OpenAI-compatible endpoints: strict, with every limit checked."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from kmd.daemon.web import MAX_NEW_TOKENS
from kmd.daemon.openai_api.errors import MAX_CONTENT_CHARS, MAX_MESSAGES, MAX_STOP, MAX_STOP_CHARS

# ----- request bodies ------------------------------------------------------------------------


class GenerationBody(BaseModel):
    """What both endpoints take."""

    # Text is never stripped: whitespace is part of a prompt.
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=512)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)  # OpenAI's default; 0 is greedy
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, bool] | None = None
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    user: str | None = Field(default=None, max_length=256)  # accepted, not used
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported")
        return n

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value: float | None) -> float | None:
        if value:
            raise ValueError("penalties are not supported (leave them out or 0)")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value:
            raise ValueError("logit_bias is not supported")
        return value

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str] | None:
        stops = [value] if isinstance(value, str) else value
        if stops is None:
            return None
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"each stop sequence must be 1-{MAX_STOP_CHARS} characters")
        return stops

    @field_validator("stream_options")
    @classmethod
    def _stream_options(cls, value: dict[str, bool] | None) -> dict[str, bool] | None:
        if value and set(value) - {"include_usage"}:
            raise ValueError(f"unsupported stream option(s): {sorted(set(value) - {'include_usage'})}")
        return value

    @property
    def stops(self) -> list[str]:
        return list(self.stop or [])  # type: ignore[arg-type]  # normalised to a list above

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.get("include_usage"))


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str = Field(max_length=MAX_CONTENT_CHARS)


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] = Field(max_length=MAX_CONTENT_CHARS)
    name: str | None = Field(default=None, max_length=64)

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatBody(GenerationBody):
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS)  # newer name of max_tokens
    logprobs: bool | None = None
    top_logprobs: int | None = None

    @field_validator("logprobs", "top_logprobs")
    @classmethod
    def _no_logprobs(cls, value: Any) -> Any:
        if value:
            raise ValueError("logprobs are not supported")
        return value

    default_tokens: ClassVar[int] = MAX_NEW_TOKENS  # OpenAI's default for chat is the rest of the context

    @property
    def requested_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionBody(GenerationBody):
    prompt: str | list[str] = Field(max_length=MAX_CONTENT_CHARS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("exactly one prompt per request (a list of one string, or a string)")
        text = value if isinstance(value, str) else value[0]
        if not text:
            raise ValueError("the prompt is empty")
        if len(text) > MAX_CONTENT_CHARS:
            raise ValueError(f"the prompt is over {MAX_CONTENT_CHARS} characters")
        return value

    @model_validator(mode="after")
    def _unsupported(self) -> CompletionBody:
        for name, ok in (("echo", not self.echo), ("suffix", self.suffix is None),
                         ("best_of", self.best_of in (None, 1)), ("logprobs", not self.logprobs)):  # fmt: skip
            if not ok:
                raise ValueError(f"{name} is not supported")
        return self

    @property
    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    default_tokens: ClassVar[int] = 16  # OpenAI's default for completions

    @property
    def requested_tokens(self) -> int | None:
        return self.max_tokens
