"""megamoe: distributed pretraining of MoE-Mamba language models (Mamba-1 + Switch MoE)."""
__version__ = "0.1.0"
