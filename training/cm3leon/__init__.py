"""Training CM3Leon: documents from the image world, the CM3 objective, the tokenizers and the model."""
