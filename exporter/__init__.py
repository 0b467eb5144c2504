"""mistral-export: the canonical Mistral graph, traced once, lowered per target."""

__version__ = "0.1.0"
