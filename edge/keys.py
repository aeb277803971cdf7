"""One source of truth for names shared by `converters/` and `edge/`.

Bundle file names, manifest keys, part names and the MiniCPM-o 2.6 special-token strings live here so that the
converter that writes a bundle and the runtime that reads it cannot drift apart (the way llama.cpp's
`clip-impl.h` holds the KEY_/TN_ constants for both its converter and its loader).
"""

from __future__ import annotations

# --- bundle layout ---------------------------------------------------------------------------------------------
BUNDLE_MANIFEST = "bundle.json"
# Bump when the manifest layout or a part's file contract changes; the runtime refuses other versions.
# 2: the llm part's meta carries the checkpoint's chat template and its special-token variables (LLM_META_*),
#    and the GGUF types added tokens as llama.cpp's convert_hf_to_gguf.py does.
BUNDLE_SCHEMA_VERSION = 2
BUNDLE_ARCH = "minicpmo-2.6"

# Part names in `bundle.json["parts"]`. Each part has `files` (role -> {path, sha256, bytes}) and `meta`.
PART_LLM = "llm"
PART_VISION = "vision"
PART_AUDIO = "audio"
PART_TTS = "tts"

LLM_GGUF = "llm.gguf"
# `parts.llm.meta` keys of what the prompt and the decoder need from the checkpoint's tokenizer files.
LLM_META_CHAT_TEMPLATE = "chat_template"  # tokenizer_config.json `chat_template` (Jinja text), or null
LLM_META_TEMPLATE_VARIABLES = "template_variables"  # bos_token, eos_token, ... as transformers passes them
LLM_META_SKIPPED_IN_TEXT = "skipped_in_text"  # ids that HF decode(skip_special_tokens=True) drops

# --- MiniCPM-o 2.6 special tokens (spec §3.1) --------------------------------------------------------------------
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
IMAGE_START = "<image>"
IMAGE_END = "</image>"
SLICE_START = "<slice>"
SLICE_END = "</slice>"
IMAGE_ID_START = "<image_id>"
IMAGE_ID_END = "</image_id>"
UNK = "<unk>"  # placeholder token whose embeddings are replaced by image/audio embeddings
AUDIO_START = "<|audio_start|>"
AUDIO_END = "<|audio_end|>"
SPK_BOS = "<|spk_bos|>"
SPK = "<|spk|>"
SPK_EOS = "<|spk_eos|>"
TTS_BOS = "<|tts_bos|>"
TTS_EOS = "<|tts_eos|>"
UNIT = "<unit>"
DEFAULT_VOICE = "<reserved_53>"

# Tokens that end an LLM reply (spec §1.1, §3.1).
TERMINATORS = (IM_END, ENDOFTEXT, TTS_EOS)

# Special tokens whose ids the runtime needs; the converter records them in the manifest.
RUNTIME_SPECIAL_TOKENS = (
    IM_START, IM_END, ENDOFTEXT, IMAGE_START, IMAGE_END, SLICE_START, SLICE_END, IMAGE_ID_START, IMAGE_ID_END,
    UNK, AUDIO_START, AUDIO_END, SPK_BOS, SPK, SPK_EOS, TTS_BOS, TTS_EOS,
)
