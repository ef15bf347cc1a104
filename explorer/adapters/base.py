"""What every architecture adapter exposes: the prunable structure of one block.

A block has two groups of prunable units:
  * attention units: one unit = one key/value head group (for multi-head attention without
    GQA that is one head; for GQA it is one KV head plus the `heads_per_group` query heads
    that share it);
  * MLP units: one unit = one FFN neuron (a row of the up/gate projections and a column of
    the down projection, pruned together).

Each unit group is described by `ParamSlice`s: which parameter, along which dimension, and
how many consecutive indices one unit owns there. Scoring (importance.py) and surgery
(pruning.py) are written once over these slices; adapters only say where things are.
"""
from __future__ import annotations

from dataclasses import dataclass, field


from torch import nn


@dataclass
class ParamSlice:
    """Unit u owns indices [offset + u*unit_size, offset + (u+1)*unit_size) of
    `module.<name>` along `dim`. `per_head` marks query/output slices that split further
    into the query heads of a KV group (for per-query-head display)."""

    module: nn.Module
    name: str  # "weight" or "bias"
    dim: int
    unit_size: int
    offset: int = 0
    per_head: bool = False

    @property
    def param(self) -> nn.Parameter:
        return getattr(self.module, self.name)


@dataclass
class UnitGroup:
    """Prunable units of one kind ("attention" or "mlp") in one block."""

    kind: str
    n_units: int
    slices: list[ParamSlice]
    out_module: nn.Module  # its *input* is the unit activation (o_proj / down_proj)
    act_unit_size: int  # channels of that activation per unit

    @property
    def params_per_unit(self) -> int:
        """Parameters removed with one unit (weights and biases of every slice)."""
        total = 0
        for s in self.slices:
            p = s.param
            other = p.numel() // p.shape[s.dim]  # elements per index along dim
            total += s.unit_size * other
        return total


@dataclass
class Block:
    index: int  # position in the current model
    module: nn.Module
    attn: UnitGroup
    mlp: UnitGroup
    heads_per_group: int  # query heads per attention unit (1 without GQA)
    head_dim: int
    mid_module: nn.Module  # output (first element) is the residual stream between attention and MLP ...
    mid_adds_input: bool  # ... once the block input is added (pre-LN blocks)

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.module.parameters())


@dataclass
class Adapter:
    """Base class; one subclass per architecture family, one file each."""

    family: str = ""
    model_types: tuple[str, ...] = ()
    lora_targets: tuple[str, ...] = ()  # module-name suffixes for peft inside the blocks
    extras: dict = field(default_factory=dict)

    # --- where things are -------------------------------------------------------------
    def base(self, model: nn.Module) -> nn.Module:
        """The bare transformer (no task head)."""
        raise NotImplementedError

    def layers(self, model: nn.Module) -> nn.ModuleList:
        raise NotImplementedError

    def block(self, model: nn.Module, i: int) -> Block:
        raise NotImplementedError

    def blocks(self, model: nn.Module) -> list[Block]:
        return [self.block(model, i) for i in range(len(self.layers(model)))]

    # --- keeping modules consistent after surgery ---------------------------------------
    def after_prune(self, block: Block) -> None:
        """Update module attributes that cache widths (e.g. number of heads)."""

    def set_layers(self, model: nn.Module, keep: list[int]) -> None:
        """Keep only the blocks at `keep` (ShortGPT-style layer drop)."""
        layers = self.layers(model)
        new = nn.ModuleList([layers[i] for i in keep])
        self._replace_layers(model, new)
        model.config.num_hidden_layers = len(new)
        for i, layer in enumerate(new):  # caches index layers by position
            for m in layer.modules():
                if hasattr(m, "layer_idx"):
                    m.layer_idx = i
        if getattr(model.config, "layer_types", None):
            model.config.layer_types = [model.config.layer_types[i] for i in keep]

    def _replace_layers(self, model: nn.Module, new: nn.ModuleList) -> None:
        raise NotImplementedError

    def update_config(self, model: nn.Module) -> bool:
        """Write uniform widths into the config where it can express them, so that the saved
        directory loads with plain `from_pretrained`. Returns True if it could."""
        return False

    def enable_output_bias(self, model: nn.Module) -> bool:
        """Give every block's output projections a bias (for reconstruction's bias
        compensation) in a way the config records, so the saved model still loads; True if
        they have one afterwards. Default: only where the architecture already has them."""
        return all(g.out_module.bias is not None for b in self.blocks(model) for g in (b.attn, b.mlp))

    def uniform_widths(self, model: nn.Module) -> tuple[int, int] | None:
        """(attention units, FFN neurons) if every layer has the same, else None."""
        blocks = self.blocks(model)
        groups, neurons = {b.attn.n_units for b in blocks}, {b.mlp.n_units for b in blocks}
        return (groups.pop(), neurons.pop()) if len(groups) == len(neurons) == 1 else None


def linear_out(module: nn.Module) -> int:
    """Output width of an nn.Linear or a GPT-2 Conv1D (weight (in, out))."""
    return module.weight.shape[0] if isinstance(module, nn.Linear) else module.weight.shape[1]


def sync_linear_attrs(module: nn.Module) -> None:
    """Make in/out feature attributes match the (sliced) weight."""
    w = module.weight
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = w.shape
    elif hasattr(module, "nf"):  # transformers' Conv1D: weight (nx, nf)
        module.nf = w.shape[1]
        if hasattr(module, "nx"):
            module.nx = w.shape[0]


def uniform(values: list[int]) -> bool:
    return len(set(values)) <= 1


