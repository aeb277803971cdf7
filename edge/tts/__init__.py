"""Speech out: the MiniCPM-o 2.6 TTS (ConditionalChatTTS + DVAE + Vocos) over onnxruntime and numpy."""

from edge.tts.generate import TTS, TTSOptions, TtsState
from edge.tts.sampling import CodeSampler, SamplingOptions
from edge.tts.text import NumberStyle, TtsTokenizer, prepare_tts_text

__all__ = ["TTS", "TTSOptions", "TtsState", "SamplingOptions", "CodeSampler", "NumberStyle", "TtsTokenizer",
           "prepare_tts_text"]
