"""weightdiff: generate neural-network weights with a conditional diffusion transformer."""
__version__ = "0.1.0"
