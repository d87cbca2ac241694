"""The dense-versus-Mixture-of-Transformers study (``patchwork train mot-study``)."""
