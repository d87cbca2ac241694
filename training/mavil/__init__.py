"""MAViL: masked audio-video encoder training (both stages), linear probes, indexes and evaluation."""
