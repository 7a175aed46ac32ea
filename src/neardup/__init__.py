"""neardup: near-duplicate image search."""
__version__ = "0.1.0"
