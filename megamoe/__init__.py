"""megamoe: distributed pretraining of MoE-Mamba language models (Mamba-1 + Switch MoE)."""
import warnings

__version__ = "0.1.0"

# megatron-core warns at import, from several of its modules, that Transformer Engine and apex are missing; megamoe
# says which paths it uses itself (the start-up log line), so that one warning is silenced here, once.
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*", category=UserWarning)
# megatron-core 0.17+ warns, when a one-process tool (evaluate, generate) logs through it without torch.distributed,
# that it cannot tell the rank and takes 0: that is the point there.
warnings.filterwarnings("ignore", message="Could not determine rank from torch.distributed.*", category=UserWarning)
