"""Inference engines behind one protocol: ``transformers`` (CPU, any GPU) and ``vllm`` (GPU)."""
