"""CM3Leon: retrieval-augmented decoding over joint text, image and audio tokens, with guidance."""
