"""diffprune: structural pruning for diffusion models (Diff-Pruning, Fang, Ma & Wang, NeurIPS 2023)."""
__version__ = "0.1.0"
