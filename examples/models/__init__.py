"""Real pretrained models available offline (converted from files shipped inside PyPI wheels)."""
