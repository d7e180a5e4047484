"""The OpenAI request and response bodies the server speaks, as pydantic models (the subset we support).

Requests validate strictly enough that a bad field is a 400 naming it (an int field takes no `true` or
`1.5`; numbers are range-checked with OpenAI's ranges); fields OpenAI defines that we do not act on
(`user`, `logit_bias: {}`...) are accepted and ignored, as other OpenAI-compatible servers do, so stock
clients work. Responses follow the OpenAI shapes field for field, including both logprobs formats:
chat's `{"content": [{token, logprob, bytes, top_logprobs}]}` and the legacy completions one
(`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`) that lm-evaluation-harness reads.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, model_serializer, model_validator

MAX_N = 64  # choices per request: each is an engine request, so this bounds one call's share of the queue
MAX_STOP = 16  # OpenAI allows 4; lm-eval passes a task's whole `until` list
MAX_LOGPROBS = 20  # the engine's limit (SamplingParams.validate)
INT64 = 2**63

Int = StrictInt  # no bool, no float, no numeric string: `"max_tokens": true` is a 400, not 1
Float = StrictFloat  # takes 1 as 1.0, but not true or "0.5"
TokenId = Annotated[StrictInt, Field(ge=0)]
StopString = Annotated[StrictStr, Field(min_length=1)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


# ---- errors --------------------------------------------------------------------------------------------

class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


# ---- requests ------------------------------------------------------------------------------------------

class StreamOptions(_Body):
    include_usage: StrictBool = False


class SamplingFields(_Body):
    """What both endpoints share. None = not given: the model's generation_config.json default, else OpenAI's."""
    model: StrictStr | None = None  # optional here (OpenAI requires it); when given it must name the served model
    max_tokens: Int | None = Field(None, ge=0)
    temperature: Float | None = Field(None, ge=0.0, le=2.0)
    top_p: Float | None = Field(None, gt=0.0, le=1.0)
    top_k: Int | None = Field(None, ge=-1)  # extension (vLLM); -1 or 0 = off
    min_p: Float | None = Field(None, ge=0.0, le=1.0)  # extension
    frequency_penalty: Float | None = Field(None, ge=-2.0, le=2.0)
    presence_penalty: Float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: Float | None = Field(None, gt=0.0, le=10.0)  # extension (HF/CTRL rule)
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP)] | None = None
    seed: Int | None = Field(None, ge=-INT64, lt=INT64)
    n: Int = Field(1, ge=1, le=MAX_N)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None  # accepted, unused
    ignore_eos: StrictBool = False  # extension: generate max_tokens tokens whatever the model says
    stop_token_ids: Annotated[list[TokenId], Field(max_length=64)] | None = None  # extension: besides EOS


class TextPart(_Body):
    type: Literal["text"]
    text: StrictStr


class FunctionCall(_Body):
    name: StrictStr
    arguments: StrictStr  # a JSON object, as OpenAI sends it


class MessageToolCall(_Body):
    id: StrictStr
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Body):
    # ChatML renders any role name literally; these are the ones a MiniCPM4 chat model was trained on
    # (developer is OpenAI's new name for system and is rendered as system; tool carries a tool call's result).
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | Annotated[list[TextPart], Field(min_length=1)] | None = None
    name: StrictStr | None = None  # accepted, unused
    tool_calls: Annotated[list[MessageToolCall], Field(max_length=64)] | None = None  # assistant turns
    tool_call_id: StrictStr | None = None  # tool turns

    @model_validator(mode="after")
    def _content_or_calls(self):
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is required (only an assistant message with tool_calls may omit it)")
        return self


class FunctionSpec(_Body):
    name: Annotated[StrictStr, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
    description: StrictStr | None = None
    parameters: dict | None = None  # JSON schema of the keyword arguments


class ToolSpec(_Body):
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(_Body):
    name: StrictStr


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    tools: Annotated[list[ToolSpec], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    max_completion_tokens: Int | None = Field(None, ge=0)  # OpenAI's newer name for max_tokens
    logprobs: StrictBool = False
    top_logprobs: Int | None = Field(None, ge=0, le=MAX_LOGPROBS)


class CompletionRequest(SamplingFields):
    # one string, several strings, one token-id list, or several (what lm-eval sends, tokenized_requests)
    prompt: (StrictStr | Annotated[list[StrictStr], Field(min_length=1)] | Annotated[list[TokenId], Field(min_length=1)]
             | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1)])
    logprobs: Int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: StrictBool = False
    best_of: Int | None = Field(None, ge=1, le=MAX_N)  # accepted only when it equals n (no server-side ranking)
    suffix: StrictStr | None = None  # insertion is not supported: only None or "" is accepted


# ---- responses -----------------------------------------------------------------------------------------

class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[MessageToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class DeltaToolCall(BaseModel):
    index: int
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None

    @model_serializer(mode="wrap")
    def _present_only(self, handler):  # OpenAI sends {"content": "..."}, {"role": ...} or {}, never nulls here
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    """The legacy format: one entry per token; the first prompt token (echo) has no logprob (null)."""
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)  # character offset of each token in the choice's text


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None  # None only in stream chunks


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "minicpm4"
    max_model_len: int  # extension (vLLM): prompt + completion tokens at most


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
