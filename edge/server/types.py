"""Request and response models of the OpenAI-compatible API (the subset this server implements).

Requests: unknown top-level fields are ignored (as vLLM does), so clients that send newer OpenAI fields keep
working; fields that would change the result and are not implemented are rejected by the app with a message.
vLLM's sampling extras `top_k`, `min_tokens` and `repetition_penalty` are accepted too.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field


def _random_if_negative(seed: int | None) -> int | None:
    """llama-server's rule: a negative seed (the usual -1) means "random", i.e. no seed."""
    return None if seed is not None and seed < 0 else seed


# A sampling seed; -1 (any negative value) = random, as in llama-server.
Seed = Annotated[int | None, AfterValidator(_random_if_negative)]


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


# --- chat completion request -------------------------------------------------------------------------------------
class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class URLRef(_Lenient):
    url: str
    detail: str | None = None  # OpenAI's image detail hint; slicing is the model's own (max_slice_nums)


class ImagePart(_Lenient):
    type: Literal["image_url"]
    image_url: URLRef


class InputAudio(_Lenient):
    data: str  # base64 of the file bytes
    format: str = "wav"


class InputAudioPart(_Lenient):
    type: Literal["input_audio"]
    input_audio: InputAudio


class AudioURLPart(_Lenient):  # vLLM's extension
    type: Literal["audio_url"]
    audio_url: URLRef


class VideoURLPart(_Lenient):  # vLLM's extension
    type: Literal["video_url"]
    video_url: URLRef


ContentPart = Annotated[Union[TextPart, ImagePart, InputAudioPart, AudioURLPart, VideoURLPart],
                        Field(discriminator="type")]


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[ContentPart], None] = None
    name: str | None = None


class AudioOutput(_Lenient):
    voice: str = "default"
    format: str = "wav"


class StreamOptions(_Lenient):
    include_usage: bool = False


class ChatCompletionRequest(_Lenient):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    seed: Seed = None
    stop: Union[str, list[str], None] = None
    n: int | None = 1
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    logit_bias: dict[str, float] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    modalities: list[Literal["text", "audio"]] | None = None
    audio: AudioOutput | None = None
    user: str | None = None
    # vLLM sampling extras
    top_k: int | None = Field(default=None, ge=0)
    min_tokens: int | None = Field(default=None, ge=0)
    repetition_penalty: float | None = Field(default=None, gt=0.0)


class SpeechRequest(_Lenient):
    model: str | None = None
    input: str = Field(min_length=1)
    voice: str = "default"
    response_format: str = "wav"
    speed: float | None = None
    instructions: str | None = None
    seed: Seed = None  # extension: makes the sampled speech reproducible


# --- responses ---------------------------------------------------------------------------------------------------
class _Out(BaseModel):
    model_config = ConfigDict(extra="allow")


class PromptTokensDetails(_Out):
    cached_tokens: int | None = None  # not reported: llama.cpp's prefix reuse is not counted per request
    audio_tokens: int = 0
    image_tokens: int = 0  # not in OpenAI's schema; what the images cost (the prompt_tokens include it)


class CompletionTokensDetails(_Out):
    audio_tokens: int = 0  # this model speaks its text tokens: audio costs no extra LLM tokens


class Usage(_Out):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None
    completion_tokens_details: CompletionTokensDetails | None = None


class AudioData(_Out):
    id: str
    data: str | None = None
    transcript: str | None = None
    expires_at: int | None = None


class AssistantMessage(_Out):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    audio: AudioData | None = None


class Choice(_Out):
    index: int = 0
    message: AssistantMessage
    finish_reason: str
    logprobs: None = None


class ChatCompletion(_Out):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None


class Delta(_Out):
    role: str | None = None
    content: str | None = None
    audio: AudioData | None = None


class ChunkChoice(_Out):
    index: int = 0
    delta: Delta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(_Out):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(_Out):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "minicpmo-edge"


class ModelList(_Out):
    object: Literal["list"] = "list"
    data: list[ModelCard]
