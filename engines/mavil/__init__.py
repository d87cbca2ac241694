"""MAViL: a masked audio-video encoder (audio and video ViTs and a fusion encoder)."""
