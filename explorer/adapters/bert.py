"""BERT family: BERT, RoBERTa, MiniLM (BERT layout) and DistilBERT.

Post-LayerNorm blocks: attention output = LN(h + SelfAttn(h)), block output =
LN(a + FFN(a)). Multi-head attention without GQA, so one attention unit = one head.
"""
from __future__ import annotations

from torch import nn

from .base import Adapter, Block, ParamSlice, UnitGroup


def _rows(m: nn.Module, size: int, per_head: bool = False) -> list[ParamSlice]:
    """Output rows of a Linear (weight dim 0 and its bias), `size` rows per unit."""
    out = [ParamSlice(m, "weight", 0, size, per_head=per_head)]
    if m.bias is not None:
        out.append(ParamSlice(m, "bias", 0, size, per_head=per_head))
    return out


def _cols(m: nn.Module, size: int, per_head: bool = False) -> list[ParamSlice]:
    """Input columns of a Linear (weight dim 1; the bias is not coupled)."""
    return [ParamSlice(m, "weight", 1, size, per_head=per_head)]


class BertAdapter(Adapter):
    def __init__(self):
        super().__init__(family="BERT", model_types=("bert", "roberta", "xlm-roberta", "electra"),
                         lora_targets=("query", "key", "value", "attention.output.dense",
                                       "intermediate.dense", "output.dense"))

    def base(self, model):
        return model.base_model

    def layers(self, model):
        return self.base(model).encoder.layer

    def _replace_layers(self, model, new):
        self.base(model).encoder.layer = new

    def block(self, model, i):
        layer = self.layers(model)[i]
        sa = layer.attention.self
        hd = sa.attention_head_size
        o = layer.attention.output.dense
        n_heads = sa.query.out_features // hd
        attn = UnitGroup("attention", n_heads,
                         _rows(sa.query, hd) + _rows(sa.key, hd) + _rows(sa.value, hd) + _cols(o, hd),
                         out_module=o, act_unit_size=hd)
        up, down = layer.intermediate.dense, layer.output.dense
        mlp = UnitGroup("mlp", up.out_features, _rows(up, 1) + _cols(down, 1),
                        out_module=down, act_unit_size=1)
        return Block(i, layer, attn, mlp, heads_per_group=1, head_dim=hd,
                     mid_module=layer.attention, mid_adds_input=False)

    def after_prune(self, block):
        sa = block.module.attention.self
        sa.num_attention_heads = block.attn.n_units
        sa.all_head_size = block.attn.n_units * block.head_dim

    def update_config(self, model):
        w = self.uniform_widths(model)
        # head size is hidden/num_heads in BERT configs: pruned heads cannot be expressed.
        if w is None or w[0] != model.config.num_attention_heads:
            return False
        model.config.intermediate_size = w[1]
        return True


class DistilBertAdapter(BertAdapter):
    def __init__(self):
        Adapter.__init__(self, family="DistilBERT", model_types=("distilbert",),
                         lora_targets=("q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"))

    def layers(self, model):
        return self.base(model).transformer.layer

    def _replace_layers(self, model, new):
        self.base(model).transformer.layer = new
        self.base(model).transformer.n_layers = len(new)

    def block(self, model, i):
        layer = self.layers(model)[i]
        sa = layer.attention
        hd = sa.attention_head_size
        n_heads = sa.q_lin.out_features // hd
        attn = UnitGroup("attention", n_heads,
                         _rows(sa.q_lin, hd) + _rows(sa.k_lin, hd) + _rows(sa.v_lin, hd) + _cols(sa.out_lin, hd),
                         out_module=sa.out_lin, act_unit_size=hd)
        up, down = layer.ffn.lin1, layer.ffn.lin2
        mlp = UnitGroup("mlp", up.out_features, _rows(up, 1) + _cols(down, 1),
                        out_module=down, act_unit_size=1)
        return Block(i, layer, attn, mlp, heads_per_group=1, head_dim=hd,
                     mid_module=layer.sa_layer_norm, mid_adds_input=False)

    def after_prune(self, block):
        block.module.attention.n_heads = block.attn.n_units

    def update_config(self, model):
        w = self.uniform_widths(model)
        if w is None or w[0] != model.config.n_heads:
            return False
        model.config.hidden_dim = w[1]
        return True
