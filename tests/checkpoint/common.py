"""Shared by the checkpoint tests: a small MoE-Mamba config, fixed synthetic batches, one rank's setup, small
models with MoE routing options."""
import torch

from megamoe.config import config_from_dict
from megamoe.model import build_model
from megamoe.parallel import init_distributed, set_seed
from megamoe.parallel.distributed_optimizer import ParamOwners
from megamoe.parallel.parallelize import build_parallel_model
from megamoe.parallel.tensor_parallel import gather_from_tp
from megamoe.training import make_runner, train_step
from megamoe.training.optimizer import build_optimizer
from megamoe.training.schedule import lr_at

GLOBAL_BATCH, MICRO_BATCH, SEQ, VOCAB, TRAIN_ITERS = 4, 1, 16, 64, 10


def config(tp=1, ep=1, pp=1, zero=False, cp=1, **model):
    """MoE-Mamba with attention, FFN and SwiGLU experts, so every kind of TP/EP split is exercised."""
    base = {"pattern": "MEAF", "d_model": 32, "d_state": 8, "num_experts": 4, "vocab_size": VOCAB,
            "num_heads": 4, "expert_activation": "swiglu", "capacity_factor": 0.75}
    return config_from_dict({
        "model": {**base, **model},
        "parallel": {"tensor_model_parallel_size": tp, "expert_model_parallel_size": ep,
                     "pipeline_model_parallel_size": pp, "context_parallel_size": cp,
                     "distributed_optimizer": zero},
        "data": {"mock": True, "seq_length": SEQ},
        "training": {"micro_batch_size": MICRO_BATCH, "global_batch_size": GLOBAL_BATCH, "seed": 5,
                     "train_iters": TRAIN_ITERS},
        "optimizer": {"lr": 1e-2, "lr_warmup_iters": 1}})


ROUTINGS = {  # name: model keys; together they switch on every routing option an HF export runs
    "sigmoid_top2_bias_shared": dict(pattern="MEME", top_k=2, router_score_function="sigmoid",
                                     router_enable_expert_bias=True, shared_expert_intermediate_size=16),
    "post_softmax_top2_bias": dict(pattern="MEAE", top_k=2, router_pre_softmax=False, expert_activation="gelu",
                                   router_enable_expert_bias=True),
    "projections_dense_fallback": dict(pattern="MEMM", mamba_moe_projections=["conv", "gate", "output"],
                                       mamba_moe_dense_fallback=True, top_k=2, router_renormalize=True,
                                       router_enable_expert_bias=True),
}


def routed_model(name: str, seed: int = 3):
    """(model, cfg) of ROUTINGS[name] built from `seed`, in eval mode, its weights moved off their initial values
    and every expert bias set to values large enough to change which experts tokens choose."""
    cfg = config(**ROUTINGS[name])
    model = build_model(cfg.model, seed=seed).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=generator))
        for n, b in model.named_buffers():
            if n.endswith("expert_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=generator))
    return model, cfg


def micro_batches(step, dp_rank=0, dp=1):
    """This DP rank's micro-batches of global batch `step` (Megatron's sample order)."""
    tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=torch.Generator().manual_seed(100 + step))
    out = []
    for j in range(GLOBAL_BATCH // (MICRO_BATCH * dp)):
        sample = tokens[j * MICRO_BATCH * dp + dp_rank * MICRO_BATCH:][:MICRO_BATCH]
        out.append(dict(tokens=sample[:, :-1], labels=sample[:, 1:], loss_mask=torch.ones(MICRO_BATCH, SEQ)))
    return out


def probe_tokens():
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(7))


class Rank:
    """One rank's model, runner and optimizer for `cfg`, built from the seed as a training run would."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.topo = init_distributed(cfg.parallel)
        set_seed(cfg.training.seed)
        self.model = build_parallel_model(cfg, self.topo)
        self.runner = make_runner(self.model, cfg, self.topo)
        # ZeRO-1: this rank's optimizer holds (and a checkpoint saves) the state of the parameters it owns
        self.owners = ParamOwners(self.model.parameters(), self.topo) if cfg.parallel.distributed_optimizer else None
        self.optimizer = build_optimizer(self.model, cfg.optimizer, self.topo.device,
                                         keep=self.owners.owns if self.owners else None)

    def train(self, first_step, steps) -> list:
        """Steps first_step .. first_step + steps - 1 (lr from the schedule); their losses."""
        losses = []
        for step in range(first_step, first_step + steps):
            lr = lr_at(step, self.cfg.optimizer, TRAIN_ITERS)
            batches = micro_batches(step, self.topo.dp_rank, self.topo.dp)
            record = train_step(self.runner, self.optimizer, batches, self.cfg, self.topo, lr, self.owners)
            losses.append(record["loss"])
        return losses

    @torch.no_grad()
    def logits(self) -> torch.Tensor:
        """Full-vocabulary logits of the probe tokens (every rank feeds the same tokens), outside PP."""
        self.model.eval()
        out = self.model(probe_tokens()).logits
        self.model.train()
        return gather_from_tp(out, self.topo.tp_group) if self.topo.tp > 1 else out
