"""OpenAI chat-completion semantics on top of the engine: parameter mapping, voices, response and SSE shapes.

Parameter rules (documented here and in the README):
- `temperature`, `top_p`, `seed` map to the sampler; absent values take the official `chat(sampling=True)`
  defaults (temperature 0.7, top_p 0.8, top_k 100, repetition_penalty 1.05). temperature 0 = greedy.
- `max_completion_tokens` (or the older `max_tokens`) caps the reply; above the server's `--max-tokens`
  it is a 400; absent = the server's limit. Generation also stops when the context is full ("length").
- vLLM extras `top_k`, `min_tokens`, `repetition_penalty` are honoured.
- `stop`: up to 4 strings, the reply is cut before the first one.
- Rejected with a 400 that says so (they would silently change results): `n` > 1, nonzero
  `frequency_penalty` / `presence_penalty` (the model uses a multiplicative repetition penalty: pass
  `repetition_penalty`), `logprobs`, `logit_bias`, `tools`, a `response_format` other than text.
- `modalities: ["text", "audio"]` speaks the reply; `audio.format` wav | mp3 | flac | opus | pcm16 (streaming:
  pcm16 only, 24 kHz 16-bit little-endian mono, as OpenAI). `audio.voice`: "default" or any OpenAI voice name
  = the model's own voice; a `data:audio/...;base64,` URL of a reference clip clones that voice (the
  official "audio_assistant" system prompt). As in OpenAI's API the reply text is then `message.audio.transcript`
  (streaming: `delta.audio.transcript`) and `content` is null.
- `usage.prompt_tokens` counts every prompt token including image and audio placeholder tokens
  (`prompt_tokens_details.image_tokens` / `audio_tokens` say how many).
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import time
import uuid

import numpy as np

from edge.sampling import SamplingOptions
from edge.server.engine import AudioChunk, Finished, Job, PromptReady, TextDelta
from edge.server.errors import APIError, bad_request, from_exception
from edge.server.settings import ServerSettings
from edge.server.types import (
    AssistantMessage,
    AudioData,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    CompletionTokensDetails,
    Delta,
    PromptTokensDetails,
    Usage,
)
from edge.voice import clone_message

MAX_STOP_STRINGS = 4  # OpenAI's limit
# The built-in voice names of OpenAI's API: accepted as aliases of this model's own voice so that existing
# clients (which must send one) work unchanged.
OPENAI_VOICES = frozenset({"alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage", "shimmer",
                           "verse", "marin", "cedar"})
DEFAULT_VOICE = "default"
# Audio output containers (soundfile format, subtype) and their MIME types.
AUDIO_FORMATS = {
    "wav": ("WAV", "PCM_16", "audio/wav"),
    "flac": ("FLAC", "PCM_16", "audio/flac"),
    "mp3": ("MP3", "MPEG_LAYER_III", "audio/mpeg"),
    "opus": ("OGG", "OPUS", "audio/ogg"),
    "pcm16": (None, None, "audio/pcm"),
    "pcm": (None, None, "audio/pcm"),
}
AUDIO_EXPIRY_SECONDS = 3600  # `expires_at` of a returned audio: nothing is stored server-side, it is nominal


def pcm16(wave: np.ndarray) -> bytes:
    return (np.clip(np.asarray(wave, np.float32), -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()


def encode_audio(wave: np.ndarray, sample_rate: int, fmt: str) -> bytes:
    container, subtype, _ = AUDIO_FORMATS[fmt]
    if container is None:
        return pcm16(wave)
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.clip(np.asarray(wave, np.float32), -1.0, 1.0), sample_rate, format=container, subtype=subtype)
    return buf.getvalue()


def voice_messages(voice: str, decoder, param: str) -> list[dict]:
    """Messages that set the voice: none for the default voice, the official clone prompt for a reference clip."""
    if voice in (DEFAULT_VOICE, "") or voice.lower() in OPENAI_VOICES:
        return []
    if voice.startswith("data:"):
        from edge.server.media import decode_data_url

        ref = decoder.audio(decode_data_url(voice, param), param)
        return [clone_message(ref)]
    raise bad_request(f"{param}: unknown voice {voice!r}; use 'default' (OpenAI voice names are aliases of it) "
                      "or a data:audio/wav;base64,... URL of a reference clip to clone.", param, "invalid_voice")


def with_voice(messages: list[dict], voice_msgs: list[dict]) -> list[dict]:
    """Insert the voice prompt after any leading system messages (the official prompt is the first user turn)."""
    i = 0
    while i < len(messages) and messages[i]["role"] == "system":
        i += 1
    return messages[:i] + voice_msgs + messages[i:]


@dataclasses.dataclass(frozen=True)
class ChatPlan:
    """What the request asks for beyond the Job: output shape."""

    speak: bool
    audio_format: str
    stream: bool
    include_usage: bool


def sampling_options(req, default: SamplingOptions = SamplingOptions()) -> SamplingOptions:
    o = dataclasses.replace(default, seed=req.seed)
    if req.temperature is not None:
        o = dataclasses.replace(o, temperature=req.temperature, greedy=req.temperature == 0)
    if req.top_p is not None:
        o = dataclasses.replace(o, top_p=req.top_p)
    if getattr(req, "top_k", None) is not None:
        o = dataclasses.replace(o, top_k=req.top_k)
    if getattr(req, "repetition_penalty", None) is not None:
        o = dataclasses.replace(o, repetition_penalty=req.repetition_penalty)
    return o


def check_request(req: ChatCompletionRequest, settings: ServerSettings, has_tts: bool) -> tuple[ChatPlan, int]:
    """Validate what the messages do not cover; returns the plan and max_new_tokens."""
    if req.n not in (None, 1):
        raise bad_request(f"n={req.n} is not supported; this server returns one choice (send n=1 or omit it).", "n")
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(req, name):
            raise bad_request(f"{name} is not supported: MiniCPM-o uses a multiplicative repetition penalty; send "
                              "repetition_penalty (e.g. 1.05, the official default) instead.", name, "unsupported")
    if req.logprobs or req.top_logprobs:
        raise bad_request("logprobs are not supported by this server; omit logprobs/top_logprobs.", "logprobs",
                          "unsupported")
    if req.logit_bias:
        raise bad_request("logit_bias is not supported by this server; omit it.", "logit_bias", "unsupported")
    if req.tools or req.tool_choice not in (None, "none"):
        raise bad_request("tool calling is not supported by this server; omit tools/tool_choice.", "tools",
                          "unsupported")
    if req.response_format and req.response_format.get("type", "text") != "text":
        raise bad_request("only response_format {'type': 'text'} is supported; JSON modes are not.",
                          "response_format", "unsupported")
    asked = req.max_completion_tokens or req.max_tokens
    param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
    if asked is not None and asked > settings.max_tokens:
        raise bad_request(f"{param}={asked} is above this server's limit of {settings.max_tokens} tokens; ask for "
                          f"at most {settings.max_tokens} (the limit is the server's --max-tokens).", param)
    max_new = asked or settings.max_tokens
    if req.min_tokens and req.min_tokens > max_new:
        raise bad_request(f"min_tokens={req.min_tokens} is larger than the token limit {max_new}.", "min_tokens")
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > MAX_STOP_STRINGS:
        raise bad_request(f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(stops)}.", "stop")
    speak = "audio" in (req.modalities or [])
    fmt = (req.audio.format if req.audio else "pcm16" if req.stream else "wav").lower()
    if speak:
        if not has_tts:
            raise bad_request("this bundle has no TTS part, so it cannot speak; ask for modalities ['text'].",
                              "modalities", "unsupported")
        if fmt not in AUDIO_FORMATS or fmt == "pcm":
            raise bad_request(f"audio.format {fmt!r} is not supported; use wav, mp3, flac, opus or pcm16.",
                              "audio.format")
        if req.stream and fmt != "pcm16":
            raise bad_request("with stream=true the audio is sent in chunks: audio.format must be 'pcm16' "
                              "(24 kHz 16-bit little-endian mono).", "audio.format")
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return ChatPlan(speak, fmt, req.stream, include_usage), max_new


def make_job(req: ChatCompletionRequest, converted, plan: ChatPlan, max_new: int, voice_msgs: list[dict]) -> Job:
    stops = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    msgs = with_voice(converted.messages, voice_msgs) if plan.speak else converted.messages
    return Job(messages=msgs, prompt_kwargs=converted.prompt_kwargs, sampling=sampling_options(req),
               max_new_tokens=max_new, min_new_tokens=req.min_tokens or 0, stop=stops, speak=plan.speak,
               stream_audio=plan.speak and plan.stream, tts_seed=req.seed)


def usage(prompt: PromptReady, completion_tokens: int) -> Usage:
    return Usage(prompt_tokens=prompt.prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt.prompt_tokens + completion_tokens,
                 prompt_tokens_details=PromptTokensDetails(audio_tokens=prompt.audio_tokens,
                                                           image_tokens=prompt.image_tokens),
                 completion_tokens_details=CompletionTokensDetails())


def new_ids() -> tuple[str, str, int]:
    return f"chatcmpl-{uuid.uuid4().hex}", f"audio_{uuid.uuid4().hex}", int(time.time())


async def complete(events, plan: ChatPlan, model: str) -> dict:
    """Collect an engine run into a ChatCompletion body."""
    cid, aid, created = new_ids()
    prompt, finished, audio, rate = None, None, [], 0
    async for ev in events:
        if isinstance(ev, PromptReady):
            prompt = ev
        elif isinstance(ev, AudioChunk):
            audio.append(ev.pcm)
            rate = ev.sample_rate
        elif isinstance(ev, Finished):
            finished = ev
    if prompt is None or finished is None:  # the run ended without a result: it was cancelled
        raise APIError(499, "the request was cancelled before it finished.", code="cancelled")
    msg = AssistantMessage(content=finished.text)
    if plan.speak:
        wave = np.concatenate(audio) if audio else np.zeros(0, np.float32)
        data = base64.b64encode(encode_audio(wave, rate or 24000, plan.audio_format)).decode()
        msg = AssistantMessage(content=None, audio=AudioData(id=aid, data=data, transcript=finished.text,
                                                             expires_at=created + AUDIO_EXPIRY_SECONDS))
    body = ChatCompletion(id=cid, created=created, model=model, usage=usage(prompt, finished.completion_tokens),
                          choices=[Choice(message=msg, finish_reason=_finish(finished.finish_reason))])
    return body.model_dump(exclude_none=True)


def _finish(reason: str) -> str:
    return reason if reason in ("stop", "length") else "stop"


def _sse(obj) -> bytes:
    data = obj.model_dump(exclude_none=True) if hasattr(obj, "model_dump") else obj
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


async def sse_stream(events, first: PromptReady, plan: ChatPlan, model: str):
    """Server-sent events of a streaming chat completion (OpenAI chunk shapes, `data: [DONE]` at the end)."""
    cid, aid, created = new_ids()

    def chunk(delta: Delta, finish: str | None = None) -> bytes:
        return _sse(ChatCompletionChunk(id=cid, created=created, model=model,
                                        choices=[ChunkChoice(delta=delta, finish_reason=finish)]))

    try:
        yield chunk(Delta(role="assistant", content="" if not plan.speak else None))
        finished = None
        async for ev in events:
            if isinstance(ev, TextDelta):
                yield chunk(Delta(audio=AudioData(id=aid, transcript=ev.text)) if plan.speak
                            else Delta(content=ev.text))
            elif isinstance(ev, AudioChunk):
                yield chunk(Delta(audio=AudioData(id=aid, data=base64.b64encode(pcm16(ev.pcm)).decode())))
            elif isinstance(ev, Finished):
                finished = ev
        if finished is not None:
            yield chunk(Delta(), _finish(finished.finish_reason))
            if plan.include_usage:
                yield _sse(ChatCompletionChunk(id=cid, created=created, model=model, choices=[],
                                               usage=usage(first, finished.completion_tokens)))
    except Exception as e:  # noqa: BLE001 - the response has started: report in-band, as OpenAI does
        yield _sse(from_exception(e).body())
    finally:
        await events.aclose()
    yield b"data: [DONE]\n\n"
