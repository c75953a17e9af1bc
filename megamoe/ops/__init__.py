"""Mamba-1 ops with mamba_ssm's calling conventions, dispatched by device."""
from megamoe.ops.causal_conv1d import causal_conv1d
from megamoe.ops.selective_scan import selective_scan
from megamoe.ops.selective_scan_ref import selective_scan_ref
from megamoe.ops.state_update import selective_state_update, selective_state_update_ref

__all__ = ["causal_conv1d", "selective_scan", "selective_scan_ref", "selective_state_update",
           "selective_state_update_ref"]
