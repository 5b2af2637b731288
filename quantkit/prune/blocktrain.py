"""Block-wise nonlinear reconstruction (`--prune-refit train`): after the sequential least-squares
refit of a channel group (sequential.py), the block's kept parameters are trained with Adam so the
pruned block reproduces the ORIGINAL model's block output on the calibration tokens.

The least-squares refit can only re-solve the consumer (the down projection of an FFN): it is
the best linear map of the kept hidden units, whose values it cannot change. Here the producer
columns of the kept units, every per-channel constant on the way (the FFN's bias) and the
consumer's weights and bias move together, through the activation, towards

    T = X_o W + b + (r_o - r_p)

the same target the refit solves for (the original block output after the residual Add, minus
the pruned model's residual), on the block inputs of the model pruned so far. Only real tokens
count (padded positions weigh 0 in the refit and are dropped here). Every HOLDOUT-th calibration
batch is held out: training starts from the refit and keeps the parameters of its best held-out
error (the refit's own if training never beats it), stopping after PATIENCE checks without a gain.

A block is trained when its producers and consumers are MatMuls with 2-D weights on the last
axis and everything between them is elementwise (the ops of OPS below); otherwise the refit
stands and the record says why. torch is imported here only, when this refit is asked for.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from quantkit.errors import ConfigError
from quantkit.graph.ir_edit import const_array
from quantkit.prune.groups import BINARY, UNARY, Group


@dataclass(frozen=True)
class Settings:
    steps: int = 800  # Adam steps per block at most (about a minute per MiniLM layer on 2 cores)
    batch: int = 1024  # tokens per step
    lr: float = 1e-4  # Adam, decayed to 0 over `steps` by a cosine (MiniLM, 2,000 steps, error after the
    # LayerNorm: the first four blocks' held-out errors fell further than at 5e-5; BENCHMARKS.md stop 24)
    every: int = 50  # steps between held-out checks
    patience: int = 6  # checks without a held-out gain before stopping
    holdout: int = 8  # every holdout-th calibration batch is held out (never trained on)
    seed: int = 0
    norm: bool = True  # residual Add -> LayerNormalization: match after the LayerNorm (see layer_norm_after)


SETTINGS = Settings()  # module level so a benchmark can set it (as prune_sweep.py sets the ridge)


def settings_for(steps: int | None) -> Settings:
    """SETTINGS with --prune-train-steps (None: its own steps)."""
    from dataclasses import replace

    return SETTINGS if steps is None else replace(SETTINGS, steps=steps)


def require_torch(refit: str = "train") -> None:
    """ConfigError up front (before any calibration pass) when torch is missing."""
    from importlib.util import find_spec

    if find_spec("torch") is None:
        raise ConfigError(f"--prune-refit {refit} trains the pruned blocks in PyTorch, which is not installed: "
                          "pip install 'quantkit[torch]' (CPU torch) or use --prune-refit sequential")


# the elementwise ops a block may hold between its layers: those channel groups pass through
# (prune/groups.py), run in torch by finetune/ops.py, but Clip, HardSigmoid and PRelu (a block with them
# keeps its refit)
OPS = (UNARY | BINARY) - {"Clip", "HardSigmoid", "PRelu"}


def path_nodes(model: ir.Model, group: Group) -> list[ir.Node] | str:
    """The elementwise nodes between the group's producers and consumers in graph order, or why
    the block cannot be trained."""
    if group.carriers or group.axis != -1:
        return "a channel axis other than the last, or BatchNorm / depthwise carriers"
    for node in group.producers + group.consumers:
        w = const_array(node.inputs[1])
        if node.op_type != "MatMul" or w is None or w.ndim != 2:
            return f"{node.op_type} {node.name} is not a MatMul with a 2-D weight"
    inside = {id(v) for v in group.tensors}
    ends = {id(n) for n in group.producers + group.consumers}
    nodes = [n for n in model.graph if id(n) not in ends and any(id(v) in inside for v in n.outputs)]
    for n in nodes:
        if n.op_type not in OPS or n.domain not in ("", "ai.onnx") or len(n.outputs) != 1:
            return f"{n.op_type} {n.name} between the layers is not an op the training runs"
        if any(v is None or (id(v) not in inside and const_array(v) is None) for v in n.inputs):
            return f"{n.op_type} {n.name} between the layers reads a tensor from outside the block"
    return nodes


@dataclass
class Rows:
    """The block's training data: per producer input, its rows in the pruned model, and per
    consumer, its target rows, real tokens only; `held` marks the held-out batches' rows."""

    inputs: dict[str, list[np.ndarray]] = field(default_factory=dict)
    targets: dict[str, list[np.ndarray]] = field(default_factory=dict)
    residuals: dict[str, list[np.ndarray]] = field(default_factory=dict)  # per consumer: r_p, when it has one
    held: list[np.ndarray] = field(default_factory=list)
    batches: int = 0
    extra: bool = False  # rows added now come from extra training data: never held out

    def add(self, inputs: dict[str, np.ndarray], targets: dict[str, np.ndarray], weights: np.ndarray | None,
            residuals: dict[str, np.ndarray] | None = None) -> None:
        """inputs: name -> [positions, C_in] rows, targets (and residuals): consumer -> [positions, N],
        in the same row order; weights: one per position (0 for padded tokens) or None."""
        real = slice(None) if weights is None else np.asarray(weights).reshape(-1) > 0
        n = 0
        for d, src in ((self.inputs, inputs), (self.targets, targets), (self.residuals, residuals or {})):
            for name, rows in src.items():
                d.setdefault(name, []).append(np.asarray(rows, np.float32)[real])
                n = len(d[name][-1])
        self.held.append(np.full(n, not self.extra and self.batches % SETTINGS.holdout == SETTINGS.holdout - 1))
        self.batches += not self.extra

    def arrays(self):
        """Inputs, targets, residuals (each name -> rows) and the held-out flag per row."""
        def cat(d):
            return {k: np.concatenate(v) for k, v in d.items()}

        return cat(self.inputs), cat(self.targets), cat(self.residuals), np.concatenate(self.held)


def layer_norm_after(consumer: ir.Node) -> tuple[np.ndarray, float] | None:
    """(scale, epsilon) of the LayerNormalization over the last axis that is the only reader of
    the residual Add the consumer's output reaches (through its bias Add), or None. In a post-LN
    encoder (BERT, MiniLM) that LayerNorm's output is what the next layer reads: the error that
    counts is after it, where each token's error is divided by that token's spread and each
    channel's multiplied by its scale (the shift cancels)."""
    value = consumer.outputs[0]
    for _ in range(3):
        uses = list(value.uses())
        if len(uses) != 1:
            return None
        node = uses[0].node
        if node.op_type == "LayerNormalization" and node.domain in ("", "ai.onnx"):
            scale = const_array(node.inputs[1])
            axis = node.attributes.get_int("axis", -1)
            ok = scale is not None and scale.ndim == 1 and axis in (-1, len(value.shape or ()) - 1)
            return (scale.astype(np.float32), node.attributes.get_float("epsilon", 1e-5)) if ok else None
        if node.op_type != "Add":
            return None
        value = node.outputs[0]
    return None


class Block:
    """The pruned block in torch: parameters read from the graph (the refit's values), the
    elementwise path evaluated node by node, written back with `store`."""

    def __init__(self, group: Group, nodes: list[ir.Node]):
        import torch

        self.group, self.nodes = group, nodes
        self.params: dict[str, torch.Tensor] = {}
        self.values: dict[str, ir.Value] = {}
        for node in group.producers + group.consumers:
            self._param(node.inputs[1])
        for v in group.constants:
            self._param(v)
        from quantkit.prune.structured import Consumer

        self.biases = {}
        for node in group.consumers:
            bias = Consumer.of(node).bias
            if bias is not None:
                self._param(bias)
                self.biases[node.name] = bias.name

    def _param(self, value: ir.Value) -> None:
        import torch

        self.values[value.name] = value
        self.params[value.name] = torch.tensor(const_array(value).astype(np.float32), requires_grad=True)

    def forward(self, inputs: dict) -> dict:
        """Consumer name -> output (bias included) for the producer inputs `inputs` (name -> rows)."""
        import torch

        from quantkit.finetune.ops import FLOAT_OPS

        env = {id(p.outputs[0]): inputs[p.inputs[0].name] @ self.params[p.inputs[1].name]
               for p in self.group.producers}
        for node in self.nodes:
            args = []
            for v in node.inputs:
                if id(v) in env:
                    args.append(env[id(v)])
                elif v.name in self.params:
                    args.append(self.params[v.name])
                else:
                    args.append(torch.tensor(np.array(const_array(v))))
            env[id(node.outputs[0])] = FLOAT_OPS[node.op_type](node, args)[0]
        out = {}
        for c in self.group.consumers:
            y = env[id(c.inputs[0])] @ self.params[c.inputs[1].name]
            out[c.name] = y + self.params[self.biases[c.name]] if c.name in self.biases else y
        return out

    def store(self) -> None:
        from quantkit.prune.structured import set_const

        for name, p in self.params.items():
            value = self.values[name]
            set_const(value, p.detach().numpy().astype(const_array(value).dtype).reshape(const_array(value).shape))


class Problem:
    """The training data as tensors and the space the error is measured in: per consumer, its
    output against its target rows, or, when a LayerNorm follows the residual Add (Settings.norm),
    scale * normalize(output + r_p) against scale * normalize(target + r_p)."""

    def __init__(self, rows: Rows, consumers: list[ir.Node], norm: bool):
        import torch

        xs, ts, rs, self.held = rows.arrays()
        self.x = {k: torch.from_numpy(v) for k, v in xs.items()}
        self.r = {k: torch.from_numpy(v) for k, v in rs.items()}
        self.norms = {}
        for c in consumers:
            found = layer_norm_after(c) if norm and c.name in self.r else None
            if found is not None:
                self.norms[c.name] = (torch.from_numpy(found[0]), found[1])
        self.t = {k: self.space(k, torch.from_numpy(v), slice(None)) for k, v in ts.items()}

    def space(self, name: str, y, idx):
        import torch

        if name not in self.norms:
            return y
        scale, eps = self.norms[name]
        z = y + self.r[name][idx]
        z = z - z.mean(-1, keepdim=True)
        return scale * z * torch.rsqrt((z * z).mean(-1, keepdim=True) + eps)

    def loss(self, block: Block, idx):
        out = block.forward({k: v[idx] for k, v in self.x.items()})
        return sum(((self.space(k, y, idx) - self.t[k][idx]) ** 2).mean() for k, y in out.items())

    def held_loss(self, block: Block, idx) -> float:
        import torch

        with torch.no_grad():  # the mean over every held-out row, in chunks
            return float(sum(float(self.loss(block, c)) * len(c) for c in torch.split(idx, 8192)) / len(idx))


def train_block(model: ir.Model, group: Group, rows: Rows, settings: Settings | None = None) -> dict:
    """Train the (already pruned and refit) block of `group` on `rows`, in place; the record."""
    import torch

    s = settings or SETTINGS
    nodes = path_nodes(model, group)
    if isinstance(nodes, str):
        return {"trained": False, "reason": nodes}
    data = Problem(rows, group.consumers, s.norm)
    fit_idx = torch.from_numpy(np.flatnonzero(~data.held))
    held_idx = torch.from_numpy(np.flatnonzero(data.held))
    if len(fit_idx) == 0 or len(held_idx) == 0:
        return {"trained": False, "reason": f"too few calibration batches ({rows.batches}) to hold some out"}
    block = Block(group, nodes)
    gen = torch.Generator().manual_seed(s.seed)
    opt = torch.optim.Adam(list(block.params.values()), lr=s.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, s.steps)
    start = best = data.held_loss(block, held_idx)
    best_state, best_step, stale, step = {k: p.detach().clone() for k, p in block.params.items()}, 0, 0, 0
    for step in range(1, s.steps + 1):
        idx = fit_idx[torch.randint(len(fit_idx), (min(s.batch, len(fit_idx)),), generator=gen)]
        opt.zero_grad()
        data.loss(block, idx).backward()
        opt.step()
        sched.step()
        if step % s.every and step != s.steps:
            continue
        got = data.held_loss(block, held_idx)
        if got < best:
            best, best_step, stale = got, step, 0
            best_state = {k: p.detach().clone() for k, p in block.params.items()}
        else:
            stale += 1
            if stale >= s.patience:
                break
    with torch.no_grad():
        for k, p in block.params.items():
            p.copy_(best_state[k])
    block.store()
    return {"trained": True, "steps": step, "best_step": best_step, "tokens": int(len(fit_idx)),
            "held_out_tokens": int(len(held_idx)), "after_layer_norm": sorted(data.norms),
            "held_out_mse_refit": start, "held_out_mse_trained": best}
