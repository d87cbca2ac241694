"""Mixture-of-Transformers: a causal language model whose non-embedding
weights are untied by modality, with one global self-attention over the whole
interleaved sequence. The multimodal family (``engines.cm3leon``) uses it as
its ``mot`` backbone."""
