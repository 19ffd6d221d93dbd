"""bench: a harness for 3D-aware fine-tuning of vision foundation models."""

__version__ = "0.1.0"
