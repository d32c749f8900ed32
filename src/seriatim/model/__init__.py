"""The model as plain PyTorch modules: configuration, transformer, attention and its KV caches, compact
weights, the fused decode layers, and scoring."""
