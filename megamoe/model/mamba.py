"""The Mamba-1 mixer (Gu & Dao, 2023), with mamba_ssm's and HF transformers' parameter names.

    x, z   = in_proj(h)                      (d_model -> 2 d_inner; x feeds the conv, z is the gate)
    x      = silu(causal depthwise conv1d(x))
    dt,B,C = x_proj(x)                       (d_inner -> dt_rank + 2 d_state)
    dt     = dt_proj(dt)                     (dt_rank -> d_inner; its bias is the dt bias, softplus in the scan)
    y      = selective_scan(x, dt, -exp(A_log), B, C, D, z)
    out    = out_proj(y)                     (d_inner -> d_model)

The MoE-inside-Mamba variants of the paper replace the conv projection (the x half of in_proj), the gate
projection (the z half) and/or out_proj with a Switch MoE of linear experts of the same shape; the mixer then
holds `conv_proj` and `gate_proj` instead of the fused `in_proj`.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megamoe.config import mamba_d_inner, mamba_dt_rank
from megamoe.ops import causal_conv1d, selective_scan, selective_state_update
from megamoe.ops.linear import linear, module_linear


def init_dt_bias(d_inner: int, dt_min: float, dt_max: float, dt_init_floor: float) -> torch.Tensor:
    """dt log-uniform in [dt_min, dt_max], stored through the inverse of softplus (the reference init)."""
    dt = torch.exp(torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=dt_init_floor)
    return dt + torch.log(-torch.expm1(-dt))


class MambaMixer(nn.Module):
    """Mamba-1 selective state-space mixer; (batch, L, d_model) -> (batch, L, d_model)."""

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: Optional[int] = None, dt_min: float = 0.001, dt_max: float = 0.1,
                 dt_init_floor: float = 1e-4, conv_bias: bool = True, proj_bias: bool = False,
                 d_inner: Optional[int] = None, moe_factory=None, moe_projections: tuple = ()):
        super().__init__()
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = mamba_d_inner(d_model, expand, d_inner)
        self.dt_rank = mamba_dt_rank(d_model, dt_rank)
        d_inner = self.d_inner
        self.moe_projections = tuple(moe_projections)

        def projection(kind: str, d_in: int, d_out: int, bias: bool):
            return moe_factory(d_in, d_out) if kind in self.moe_projections else nn.Linear(d_in, d_out, bias=bias)

        if "conv" in self.moe_projections or "gate" in self.moe_projections:
            self.conv_proj = projection("conv", d_model, d_inner, proj_bias)
            self.gate_proj = projection("gate", d_model, d_inner, proj_bias)
        else:
            self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=proj_bias)
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1, bias=conv_bias)
        self.x_proj = nn.Linear(d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, d_inner, bias=True)
        dt_init_std = self.dt_rank ** -0.5
        with torch.no_grad():
            nn.init.uniform_(self.dt_proj.weight, -dt_init_std, dt_init_std)
            self.dt_proj.bias.copy_(init_dt_bias(d_inner, dt_min, dt_max, dt_init_floor))
        # S4D-real initialisation: A = -(1, 2, ..., d_state) for every channel.
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(d_inner))
        self.out_proj = projection("output", d_inner, d_model, proj_bias)
        # The sequence ops, which context parallelism swaps for ones that carry the conv's halo and the scan's
        # state across ranks (megamoe.parallel.context_parallel); the model itself knows no ranks.
        self.causal_conv, self.scan = causal_conv1d, selective_scan

    def _in_projections(self, h: torch.Tensor):
        """(batch, L, d_model) -> x, z each (batch, L, d_inner_local)."""
        if hasattr(self, "in_proj"):
            return self.in_proj(h).chunk(2, dim=-1)
        return self.conv_proj(h), self.gate_proj(h)

    def _conv(self, x: torch.Tensor, seq_idx: Optional[torch.Tensor] = None) -> torch.Tensor:
        """silu(causal depthwise conv1d(x)); x (batch, d_inner, L)."""
        return self.causal_conv(x, self.conv1d.weight, self.conv1d.bias, activation="silu", seq_idx=seq_idx)

    def _ssm_inputs(self, x: torch.Tensor):
        """x (batch, L, d_inner) after conv -> dt (batch, d_inner, L) before bias, B, C (batch, d_state, L)."""
        dt, B, C = torch.split(self.x_proj(x), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight)  # the bias is added inside the scan, in fp32
        return dt.transpose(1, 2), B.transpose(1, 2), C.transpose(1, 2)

    def forward(self, h: torch.Tensor, cache: Optional[tuple] = None,
                seq_idx: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(batch, L, d_model) -> (batch, L, d_model). With `cache` (allocate_inference_cache), also leaves the
        conv and SSM states of the last token there, for `step` to go on from (prefill). seq_idx (batch, L) int32:
        packed documents; the conv and the scan restart at each."""
        x, z = self._in_projections(h)
        x = x.transpose(1, 2)  # (batch, d_inner, L)
        if cache is not None:
            keep = min(self.d_conv, x.shape[-1])
            cache[0].zero_()
            cache[0][..., -keep:] = x[..., -keep:]
        x = self._conv(x, seq_idx)
        dt, B, C = self._ssm_inputs(x.transpose(1, 2))
        out = self.scan(x, dt, -torch.exp(self.A_log.float()), B, C, self.D.float(), z=z.transpose(1, 2),
                        delta_bias=self.dt_proj.bias.float(), delta_softplus=True,
                        return_last_state=cache is not None, seq_idx=seq_idx)
        if cache is not None:
            out, last = out
            cache[1].copy_(last)
        return self.out_proj(out.transpose(1, 2))

    # Recurrent inference: constant memory per sequence.
    def allocate_inference_cache(self, batch: int, dtype=None, device=None) -> tuple:
        """(conv_state (batch, d_inner, d_conv), ssm_state (batch, d_inner, d_state) fp32), zeros."""
        d_inner = self.conv1d.weight.shape[0]
        device = device or self.A_log.device
        conv_state = torch.zeros(batch, d_inner, self.d_conv, dtype=dtype or self.conv1d.weight.dtype, device=device)
        ssm_state = torch.zeros(batch, d_inner, self.d_state, dtype=torch.float32, device=device)
        return conv_state, ssm_state

    def prefill(self, h: torch.Tensor, cache: tuple) -> torch.Tensor:
        """Full-sequence forward that also leaves the states of its last token in `cache`."""
        return self(h, cache)

    def step(self, h: torch.Tensor, cache: tuple) -> torch.Tensor:
        """One token: h (batch, 1, d_model) -> (batch, 1, d_model), updating `cache` in place. The projections go
        through ops.linear (a weight-reading GEMV; MoE projections through their own step)."""
        conv_state, ssm_state = cache
        h = h[:, 0]
        if hasattr(self, "in_proj"):
            x, z = module_linear(self.in_proj, h).chunk(2, dim=-1)
        else:
            x, z = module_linear(self.conv_proj, h), module_linear(self.gate_proj, h)
        conv_state.copy_(torch.cat([conv_state[..., 1:], x[..., None].to(conv_state.dtype)], dim=-1))
        x = (conv_state * self.conv1d.weight[:, 0]).sum(-1)
        x = F.silu(x if self.conv1d.bias is None else x + self.conv1d.bias)
        dt, B, C = torch.split(module_linear(self.x_proj, x), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = linear(dt, self.dt_proj.weight)
        y = selective_state_update(ssm_state, x, dt, self._decay(), B, C, self.D.float(), z=z,
                                   dt_bias=self.dt_proj.bias.float(), dt_softplus=True)
        return module_linear(self.out_proj, y)[:, None]

    def _decay(self) -> torch.Tensor:
        """A = -exp(A_log) in float32 for a step; without autograd computed once per value of A_log (an
        optimizer's or a load's in-place update bumps its version; a move or a cast gives it new storage). An
        inference tensor (a model built under torch.inference_mode) has no version, and a compiled step fuses it into
        the state update: computed every step there."""
        if torch.is_grad_enabled() or torch.compiler.is_compiling() or self.A_log.is_inference():
            return -torch.exp(self.A_log.float())
        key = (self.A_log._version, self.A_log.data_ptr(), self.A_log.dtype)
        if getattr(self, "_decay_of", (None,))[0] != key:
            self._decay_of = (key, -torch.exp(self.A_log.float()))
        return self._decay_of[1]
