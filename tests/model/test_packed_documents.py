"""Packed documents through the layers: attention, a Mamba mixer, whole MoE-Mamba blocks and the whole model give,
for a row [doc A | doc B | doc C] with seq_idx and reset positions, the outputs and parameter gradients of running
each document alone (fp32 against a float64 reference). MoE layers run without a capacity limit or balancing loss
here: capacity and the balancing loss count the whole micro-batch, which packing changes by design."""
import copy

import pytest
import torch

from megamoe.config import ModelConfig
from megamoe.data.packing import document_positions
from megamoe.model import Attention, Block, MambaMixer, build_model
from tests.kernels._checks import seq_idx_of

DOCS = [[5, 1, 10], [16]]
L, D = 16, 32


def _decisive_routers(module):
    """Routers with clear margins: a top-1 choice that fp32 and float64 could make differently (a near tie) would
    change the function, not its rounding."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("router.weight"):
                p.mul_(100.0)
    return module


def _packed_and_alone(module, inputs, call, seed=0):
    """(packed outputs, packed grads) in fp32 and (each document alone, its grads) in float64."""
    module = _decisive_routers(module)
    seq = seq_idx_of(DOCS, "cpu")
    pos = document_positions(seq)
    g = torch.Generator().manual_seed(seed)
    weights = torch.randn(inputs.shape[:2] + (call(module, inputs[:1, :1], None, None).shape[-1],), generator=g,
                          dtype=torch.float64)
    ref = copy.deepcopy(module).double()
    x64 = inputs.double().requires_grad_()
    alone = torch.zeros(weights.shape, dtype=torch.float64)
    for r, lengths in enumerate(DOCS):
        start = 0
        for n in lengths:
            alone[r:r + 1, start:start + n] = call(ref, x64[r:r + 1, start:start + n], None, None)
            start += n
    (alone * weights).sum().backward()
    x32 = inputs.float().requires_grad_()
    packed = call(module, x32, seq, pos)
    (packed * weights.float()).sum().backward()
    for (name, p), (_, q) in zip(module.named_parameters(), ref.named_parameters()):
        _near(f"d{name}", p.grad, q.grad)
    _near("dinput", x32.grad, x64.grad)
    _near("output", packed, alone)


def _near(name: str, fp32: torch.Tensor, fp64: torch.Tensor, tol: float = 1e-4) -> None:
    """fp32 rounding against the float64 reference: the largest error within tol x the tensor's largest value."""
    err, scale = (fp32.double() - fp64).abs().max().item(), max(fp64.abs().max().item(), 1e-3)
    assert err <= tol * scale, f"{name}: max error {err:.2e} > {tol} x {scale:.3g}"


def _hidden(seed=1):
    return torch.randn(len(DOCS), L, D, generator=torch.Generator().manual_seed(seed))


def test_attention_attends_within_each_document_from_position_zero():
    torch.manual_seed(0)
    _packed_and_alone(Attention(D, 4), _hidden(), lambda m, x, s, p: m(x, seq_idx=s, position_ids=p))


def test_mamba_mixer_restarts_at_each_document():
    torch.manual_seed(0)
    _packed_and_alone(MambaMixer(D, d_state=8), _hidden(), lambda m, x, s, p: m(x, seq_idx=s))


@pytest.mark.parametrize("kind", ["M", "E", "A", "ME"])
def test_blocks_see_only_their_document(kind):
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=D, d_state=8, num_experts=4, num_heads=4, capacity_factor=0, load_balancing_weight=0.0,
                      parallel_moe=True)
    _packed_and_alone(Block(kind, cfg), _hidden(), lambda m, x, s, p: m(x, s, p))


def test_whole_model_logits_and_gradients_equal_each_document_alone():
    cfg = ModelConfig(pattern="MEAFME", d_model=D, d_state=8, num_experts=4, num_heads=4, vocab_size=64,
                      capacity_factor=0, load_balancing_weight=0.0, expert_activation="swiglu")
    model = build_model(cfg, seed=3)
    tokens = torch.randint(0, 64, (len(DOCS), L), generator=torch.Generator().manual_seed(2))

    class Embedded(torch.nn.Module):  # the model from its embeddings on, so inputs get a gradient too
        def __init__(self):
            super().__init__()
            self.lm = model

        def forward(self, h, seq_idx=None, position_ids=None):
            return self.lm.head(self.lm.run_layers(h, seq_idx, position_ids))

    embedded = model.embedding(tokens).detach()
    _packed_and_alone(Embedded(), embedded, lambda m, x, s, p: m(x, s, p))
