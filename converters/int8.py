"""Dynamic int8 quantisation settings shared by the ONNX parts."""

# Quantise weights to 7 bits (onnxruntime's `reduce_range`). On x86 CPUs without VNNI (AVX2, plain AVX-512)
# onnxruntime's u8 x s8 kernels sum pairs into 16 bits, which 8-bit weights can saturate; onnxruntime's
# quantisation docs recommend reduce_range there. Seen on an AMD EPYC with AVX2 only: Whisper int8 cosine vs fp32
# 0.950 with 8-bit weights, 0.99987 with 7-bit (tests/test_audio_encoder.py::test_int8_cosine).
REDUCE_RANGE = True
