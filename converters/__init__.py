"""Official MiniCPM-o 2.6 checkpoint -> runtime bundle (GGUF LLM + ONNX parts). May use torch."""
