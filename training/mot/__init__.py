"""The dense-versus-Mixture-of-Transformers study (``python -m training mot-study``)."""
