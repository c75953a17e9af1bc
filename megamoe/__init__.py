"""megamoe: distributed pretraining of MoE-Mamba language models (Mamba-1 + Switch MoE)."""
import warnings

__version__ = "0.1.0"

# megatron-core warns at import, from several of its modules, that Transformer Engine and apex are missing; megamoe
# says which paths it uses itself (the start-up log line), so that one warning is silenced here, once.
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*", category=UserWarning)
