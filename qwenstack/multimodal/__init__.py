"""Multimodal input handling: decoding and preprocessing images for the vision towers."""
