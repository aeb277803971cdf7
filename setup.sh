#!/usr/bin/env bash
# Set up MiniCPM-o Edge in ./.venv on a fresh machine.
#   bash setup.sh          runtime + converter (the converter builds the built-in default bundle on first use);
#                          no torch: the converter writes its ONNX graphs from the weights with numpy + onnx
#   bash setup.sh --dev    the same plus the test tools and torch (CPU) for the reference tests
# llama-cpp-python has no Linux binary wheel on PyPI: pip compiles it (about 7-10 minutes on 2 cores, once;
# pip caches the wheel). For Metal/CUDA builds set CMAKE_ARGS first (see README, "Hardware").
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
extras="convert,server"
[ "${1:-}" = "--dev" ] && extras="convert,server,dev"

# sounddevice needs the PortAudio library; Debian/Ubuntu/Raspberry Pi OS package: libportaudio2.
if ! ldconfig -p 2>/dev/null | grep -q libportaudio; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    (apt-get install -y -qq libportaudio2 >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq libportaudio2; }) \
      || echo "note: could not install libportaudio2; microphone/speaker need it (import edge works without)."
  else
    echo "note: install PortAudio for microphone/speaker: sudo apt-get install libportaudio2 (macOS: brew install portaudio)"
  fi
fi

# The web demo's browser test drives Debian's Chromium (Playwright's own browser download is not used).
if [ "${1:-}" = "--dev" ] && ! command -v chromium >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  apt-get install -y -qq chromium >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } \
    || echo "note: could not install chromium; the browser tests will be skipped."
fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [ "${1:-}" = "--dev" ]; then
  # torch==2.13.0 is pinned in the dev extra (reference tests only); install it first so that nothing pulls a
  # different build. PyPI's Linux wheel is the CUDA one: TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
  # selects the CPU wheel.
  .venv/bin/python -m pip install -q ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==2.13.0"
fi
.venv/bin/python -m pip install -q -e ".[${extras}]"
# Silero VAD for live turn-taking: only its bundled ONNX model is used (run by onnxruntime). The package's own
# metadata requires torch, hence --no-deps; without it live mode falls back to an energy VAD.
.venv/bin/python -m pip install -q --no-deps "silero-vad==6.2.3"
echo "MiniCPM-o Edge installed in .venv ($(.venv/bin/python -c 'import edge; print(edge.__version__)'))"
