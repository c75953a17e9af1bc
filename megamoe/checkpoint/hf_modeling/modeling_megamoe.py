"""MoE-Mamba for transformers: megamoe's model in plain PyTorch, shipped as remote code with megamoe's
`--format hf` exports, so that `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` runs it
without megamoe installed.

Blocks are pre-norm residual: h + sum of the block's sublayers applied to norm(h). Mamba is Mamba-1 (a selective
scan with a diagonal A); Switch MoE routes each token to its top_k experts with an fp32 router, as megamoe's options
say (scores, top-k, expert bias, shared expert); attention is causal with RoPE. The numerics are megamoe's: norms in
fp32, softplus(dt + dt bias) in fp32 inside the scan, the router in fp32. MoE layers have no capacity limit here,
as in megamoe's generation: a token's output never depends on the other tokens of the batch.

generate() carries a MegaMoECache: per Mamba block its conv state (the last d_conv inputs) and SSM state, per
attention block its keys (RoPE applied) and values. Left padding (an attention_mask with zeros) is supported:
padded positions feed zeros into the Mamba conv and scan, and no query attends to them.
"""
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_megamoe import MegaMoEConfig

SCAN_CHUNK = 64  # time steps whose decay factors are built at once (memory: batch x d_inner x d_state x chunk)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def make_norm(config):
    if config.norm == "rmsnorm":
        return RMSNorm(config.d_model, config.norm_eps)
    return nn.LayerNorm(config.d_model, config.norm_eps)


def activate(x, activation: str):
    if activation == "swiglu":
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.gelu(x) if activation == "gelu" else F.relu(x)


class Experts(nn.Module):
    """Experts as batched weights (experts, in, out), no biases; "linear" experts have w1 alone."""

    def __init__(self, num_experts, d_in, d_hidden, d_out, activation):
        super().__init__()
        self.activation = activation
        if activation == "linear":
            self.w1 = nn.Parameter(torch.empty(num_experts, d_in, d_out))
        else:
            self.w1 = nn.Parameter(torch.empty(num_experts, d_in, 2 * d_hidden if activation == "swiglu" else d_hidden))
            self.w2 = nn.Parameter(torch.empty(num_experts, d_hidden, d_out))

    def expert(self, e, x):
        h = x @ self.w1[e]
        return h if self.activation == "linear" else activate(h, self.activation) @ self.w2[e]


class SwitchMoE(nn.Module):
    """Switch MoE without capacity, megamoe's token choice: fp32 logits; gates softmax or sigmoid; each token to the
    top_k of gates + expert_bias (post-softmax: of logits + bias, then a softmax over the chosen k), weighted by the
    chosen gates (renormalised: Megatron's rule unless set), plus the shared expert for every token. `aux_loss`
    keeps the last call's load-balancing loss (for fine-tuning). The dense fallback of MoE projections is loaded
    but never runs: without capacity no token is dropped."""

    def __init__(self, config, d_in, d_hidden, d_out, activation):
        super().__init__()
        self.num_experts, self.top_k, self.weight = config.num_experts, config.moe_top_k, config.load_balancing_weight
        self.sigmoid = config.router_score_function == "sigmoid"
        self.post_softmax = not self.sigmoid and not config.router_pre_softmax
        renormalize = config.router_renormalize
        self.renormalize = (self.sigmoid and self.top_k > 1) if renormalize is None else renormalize
        self.router = nn.Linear(d_in, config.num_experts, bias=False)
        if config.router_enable_expert_bias:  # megamoe's router.expert_bias buffer, what the choice reads only
            self.router.register_buffer("expert_bias", torch.zeros(config.num_experts))
        self.experts = Experts(config.num_experts, d_in, d_hidden, d_out, activation)
        if activation != "linear" and config.shared_expert_intermediate_size:
            self.shared = FeedForward(d_in, config.shared_expert_intermediate_size, activation)
        if activation == "linear" and config.mamba_moe_dense_fallback:
            self.fallback = nn.Linear(d_in, d_out, bias=False)
        self.aux_loss = None

    def forward(self, h):
        x = h.reshape(-1, h.shape[-1])
        logits = F.linear(x.float(), self.router.weight.float())
        gates = torch.sigmoid(logits) if self.sigmoid else torch.softmax(logits, dim=-1)
        select = logits if self.post_softmax else gates
        if hasattr(self.router, "expert_bias"):
            select = select + self.router.expert_bias.float()
        top = select.topk(self.top_k, dim=-1).indices
        weights = torch.softmax(logits.gather(1, top), dim=-1) if self.post_softmax else gates.gather(1, top)
        if self.renormalize:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        token = torch.arange(x.shape[0], device=x.device)[:, None].expand_as(top).reshape(-1)
        expert, weight = top.reshape(-1), weights.reshape(-1)
        order = torch.argsort(expert, stable=True)
        counts = torch.bincount(expert, minlength=self.num_experts)
        chunks = x[token[order]].split(counts.tolist())
        y = torch.cat([self.experts.expert(e, c) for e, c in enumerate(chunks) if c.shape[0]])
        y = y * weight[order, None].to(y.dtype)
        out = y.new_zeros(x.shape[0], y.shape[-1]).index_add(0, token[order], y)
        if hasattr(self, "shared"):
            out = out + self.shared(x).to(out.dtype)
        probs = gates / (gates.sum(-1, keepdim=True) + 1e-20) if self.sigmoid else gates
        fraction = counts.to(probs.dtype) / expert.numel()
        self.aux_loss = self.weight * self.num_experts * torch.sum(fraction * probs.mean(0))
        return out.reshape(*h.shape[:-1], out.shape[-1])


def selective_scan(u, dt, A, B, C, D, z, dt_bias, state):
    """Mamba-1's scan in fp32. u, dt, z (batch, d_inner, L); A (d_inner, d_state); B, C (batch, d_state, L);
    state (batch, d_inner, d_state) or None. Returns y in u's dtype and the last state (fp32)."""
    delta = F.softplus(dt.float() + dt_bias.float()[:, None])
    deltau = delta * u.float()
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1], dtype=torch.float32) if state is None else state.float()
    ys = []
    for s in range(0, u.shape[-1], SCAN_CHUNK):
        decay = torch.exp(delta[:, :, s:s + SCAN_CHUNK, None] * A[:, None])  # (batch, d_inner, T, d_state)
        inputs = deltau[:, :, s:s + SCAN_CHUNK, None] * B[:, None, :, s:s + SCAN_CHUNK].float().transpose(2, 3)
        Cc = C[:, :, s:s + SCAN_CHUNK].float()
        for t in range(decay.shape[2]):
            h = decay[:, :, t] * h + inputs[:, :, t]
            ys.append(torch.einsum("bdn,bn->bd", h, Cc[:, :, t]))
    y = torch.stack(ys, dim=-1) + u.float() * D.float()[:, None]
    return (y * F.silu(z.float())).to(u.dtype), h


class MambaMixer(nn.Module):
    """Mamba-1 under mamba_ssm's names; with MoE projections, conv_proj / gate_proj replace in_proj."""

    def __init__(self, config, moe_projections):
        super().__init__()
        d, di = config.d_model, config.d_inner
        self.d_state, self.d_conv, self.dt_rank = config.d_state, config.d_conv, config.dt_rank

        def projection(kind, d_in, d_out):
            if kind in moe_projections:
                return SwitchMoE(config, d_in, 0, d_out, "linear")
            return nn.Linear(d_in, d_out, bias=config.proj_bias)

        if "conv" in moe_projections or "gate" in moe_projections:
            self.conv_proj, self.gate_proj = projection("conv", d, di), projection("gate", d, di)
        else:
            self.in_proj = nn.Linear(d, 2 * di, bias=config.proj_bias)
        self.conv1d = nn.Conv1d(di, di, config.d_conv, groups=di, padding=config.d_conv - 1, bias=config.conv_bias)
        self.x_proj = nn.Linear(di, self.dt_rank + 2 * config.d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, di, bias=True)
        self.A_log = nn.Parameter(torch.empty(di, config.d_state))
        self.D = nn.Parameter(torch.empty(di))
        self.out_proj = projection("output", di, d)

    def forward(self, h, state=None, mask=None):
        """h (batch, L, d_model), state (conv_state, ssm_state) of the tokens before, mask (batch, L) of real
        tokens. Returns the output and the new state."""
        x, z = self.in_proj(h).chunk(2, dim=-1) if hasattr(self, "in_proj") else (self.conv_proj(h), self.gate_proj(h))
        x, z = x.transpose(1, 2), z.transpose(1, 2)  # (batch, d_inner, L)
        if mask is not None:
            x = torch.where(mask[:, None], x, 0)
        past = x.new_zeros(*x.shape[:2], self.d_conv) if state is None else state[0].to(x.dtype)
        u = F.silu(F.conv1d(torch.cat([past[..., 1:], x], -1), self.conv1d.weight, self.conv1d.bias,
                            groups=x.shape[1]))
        if mask is not None:
            u = torch.where(mask[:, None], u, 0)
        dt, B, C = torch.split(self.x_proj(u.transpose(1, 2)), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight)  # the bias goes inside the scan, in fp32
        y, last = selective_scan(u, dt.transpose(1, 2), -torch.exp(self.A_log.float()), B.transpose(1, 2),
                                 C.transpose(1, 2), self.D, z, self.dt_proj.bias, None if state is None else state[1])
        return self.out_proj(y.transpose(1, 2)), (torch.cat([past, x], -1)[..., -self.d_conv:], last)


def apply_rope(x, positions, base):
    """Rotate channel pairs (i, i + head_dim / 2) of x (batch, heads, n, head_dim) by their positions (batch, n)."""
    half = x.shape[-1] // 2
    inv_freq = 1.0 / (base ** (torch.arange(0, 2 * half, 2, device=x.device, dtype=torch.float32) / (2 * half)))
    angles = (positions.float()[..., None] * inv_freq)[:, None]  # (batch, 1, n, half)
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class Attention(nn.Module):
    """Causal multi-head self-attention with RoPE; qkv gives [q | k | v]."""

    def __init__(self, config):
        super().__init__()
        self.num_heads, self.rope_base = config.num_heads, config.rope_base
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.out_proj = nn.Linear(config.d_model, config.d_model, bias=False)

    def forward(self, x, state, positions, key_mask):
        """state: (keys, values) of the tokens before; key_mask (batch, past + n): which of all are real."""
        b, n, d = x.shape
        q, k, v = (t.reshape(b, n, self.num_heads, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        q, k = apply_rope(q, positions, self.rope_base), apply_rope(k, positions, self.rope_base)
        if state is not None:
            k, v = torch.cat([state[0], k], dim=2), torch.cat([state[1], v], dim=2)
        past = k.shape[2] - n
        mask, causal = None, key_mask is None and past == 0 and n > 1
        if not causal and (n > 1 or key_mask is not None):
            query = past + torch.arange(n, device=x.device)
            keys = torch.arange(past + n, device=x.device)
            mask = (keys[None] <= query[:, None])[None]  # (1, n, past + n)
            if key_mask is not None:  # padded keys are hidden; a padded query sees itself only (never an empty row)
                mask = (mask & key_mask[:, None, :]) | (keys[None] == query[:, None])[None]
            mask = mask[:, None]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        return self.out_proj(y.transpose(1, 2).reshape(b, n, d)), (k, v)


class FeedForward(nn.Module):
    def __init__(self, d_model, d_ffn, activation):
        super().__init__()
        self.activation = activation
        self.fc1 = nn.Linear(d_model, 2 * d_ffn if activation == "swiglu" else d_ffn, bias=False)
        self.fc2 = nn.Linear(d_ffn, d_model, bias=False)

    def forward(self, h):
        return self.fc2(activate(self.fc1(h), self.activation))


class Block(nn.Module):
    """Pre-norm residual block: h + the sum of its sublayers on norm(h) (Parallel MoE-Mamba: "ME")."""

    def __init__(self, config, kind, moe_projections):
        super().__init__()
        self.norm = make_norm(config)
        if "M" in kind:
            self.mixer = MambaMixer(config, moe_projections)
        if "E" in kind:
            self.moe = SwitchMoE(config, config.d_model, config.d_expert, config.d_model, config.expert_activation)
        if kind == "A":
            self.attention = Attention(config)
        if kind == "F":
            self.ffn = FeedForward(config.d_model, config.d_ffn, config.expert_activation)

    def forward(self, h, state, positions, key_mask, token_mask):
        x, out, new_state = self.norm(h), h, None
        for name in ("mixer", "moe", "attention", "ffn"):  # megamoe's order of the sum
            if not hasattr(self, name):
                continue
            if name == "mixer":
                y, new_state = self.mixer(x, state, token_mask)
            elif name == "attention":
                y, new_state = self.attention(x, state, positions, key_mask)
            else:
                y = getattr(self, name)(x)
            out = out + y
        return out, new_state


class MegaMoECache:
    """What generation keeps between calls: per block a Mamba (conv_state, ssm_state), attention (keys, values), or
    None, and how many tokens each sequence has seen."""

    is_compileable = False

    def __init__(self, num_blocks: int):
        self.states = [None] * num_blocks
        self.seen = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def reorder_cache(self, beam_idx):
        self.states = [None if s is None else tuple(t.index_select(0, beam_idx.to(t.device)) for t in s)
                       for s in self.states]


@dataclass
class MegaMoECausalLMOutput(ModelOutput):
    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    cache: Optional[MegaMoECache] = None
    aux_loss: Optional[torch.Tensor] = None


class MegaMoEPreTrainedModel(PreTrainedModel):
    config_class = MegaMoEConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]
    _is_stateful = True  # a recurrent state cannot be rolled back: no assisted decoding

    def _init_weights(self, module):
        """A fresh model's weights (from_pretrained loads every one of them); loaded tensors are left alone."""
        def fresh(p):
            return p is not None and not getattr(p, "_is_hf_initialized", False)

        with torch.no_grad():
            if isinstance(module, (nn.Linear, nn.Embedding, nn.Conv1d)) and fresh(module.weight):
                module.weight.normal_(0.0, self.config.init_std)
            if isinstance(module, (nn.Linear, nn.Conv1d, nn.LayerNorm)) and fresh(module.bias):
                module.bias.zero_()
            if isinstance(module, (RMSNorm, nn.LayerNorm)) and fresh(module.weight):
                module.weight.fill_(1.0)
            if isinstance(module, Experts):
                for w in (module.w1, getattr(module, "w2", None)):
                    if fresh(w):
                        w.uniform_(-w.shape[1] ** -0.5, w.shape[1] ** -0.5)
            if isinstance(module, MambaMixer):
                if fresh(module.A_log):
                    module.A_log.copy_(torch.log(torch.arange(1, module.d_state + 1).float()).expand_as(module.A_log))
                if fresh(module.D):
                    module.D.fill_(1.0)


class MegaMoEModel(MegaMoEPreTrainedModel):
    def __init__(self, config: MegaMoEConfig):
        super().__init__(config)
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config, kind, projections) for kind, projections
                                    in zip(config.block_types, config.layer_mamba_moe_projections))
        self.norm_f = make_norm(config)
        self.post_init()

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, cache=None):
        """The final normed hidden states (batch, n, d_model); `cache` (if given) is advanced by the n tokens."""
        h = self.embedding(input_ids) if inputs_embeds is None else inputs_embeds
        b, n = h.shape[:2]
        past = cache.seen if cache is not None else 0
        if attention_mask is not None and not bool(attention_mask.all()):
            mask = attention_mask.bool()
            if mask.shape[1] < past + n:  # a mask of the new tokens alone: the cached ones were real
                mask = F.pad(mask, (past + n - mask.shape[1], 0), value=True)
            mask = mask[:, -(past + n):]
            positions, token_mask, key_mask = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -n:], mask[:, -n:], mask
        else:
            positions = torch.arange(past, past + n, device=h.device).expand(b, n)
            token_mask = key_mask = None
        for i, block in enumerate(self.layers):
            h, state = block(h, cache.states[i] if cache is not None else None, positions, key_mask, token_mask)
            if cache is not None:
                cache.states[i] = state
        if cache is not None:
            cache.seen += n
        return self.norm_f(h)


class MegaMoEForCausalLM(MegaMoEPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embedding.weight"}

    def __init__(self, config: MegaMoEConfig):
        super().__init__(config)
        self.model = MegaMoEModel(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embedding

    def set_input_embeddings(self, value):
        self.model.embedding = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model makes its own MegaMoECache

    def prepare_inputs_for_generation(self, input_ids, cache=None, attention_mask=None, inputs_embeds=None,
                                      use_cache=True, past_key_values=None, **kwargs):
        """Only the tokens the cache has not seen yet (generate passes all of them)."""
        cache = cache if cache is not None else past_key_values
        inputs = dict(cache=cache, attention_mask=attention_mask, use_cache=use_cache)
        seen = cache.seen if cache is not None else 0
        if inputs_embeds is not None and seen == 0:
            inputs["inputs_embeds"] = inputs_embeds
        else:
            total = attention_mask.shape[1] if attention_mask is not None else input_ids.shape[1]
            inputs["input_ids"] = input_ids[:, input_ids.shape[1] - (total - seen):]
        return inputs

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, cache=None, labels=None,
                use_cache=None, logits_to_keep=0, return_dict=None, past_key_values=None, **kwargs):
        """Logits (float32) of every position (the last `logits_to_keep` when > 0). With labels (HF's convention:
        shifted here, -100 ignored), loss is the mean cross entropy, plus the MoE load-balancing loss in training."""
        cache = cache if cache is not None else past_key_values
        use_cache = (self.config.use_cache and not self.training) if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = MegaMoECache(len(self.model.layers))
        h = self.model(input_ids, inputs_embeds, attention_mask, cache)
        logits = self.lm_head(h[:, -logits_to_keep:] if logits_to_keep else h).float()
        moes = [m for m in self.modules() if isinstance(m, SwitchMoE) and m.aux_loss is not None]
        aux = sum(m.aux_loss for m in moes) if moes else None
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten().to(logits.device),
                                   ignore_index=-100)
            if aux is not None and self.training:
                loss = loss + aux
        return MegaMoECausalLMOutput(loss=loss, logits=logits, cache=cache if use_cache else None, aux_loss=aux)
