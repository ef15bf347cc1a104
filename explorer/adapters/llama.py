"""LLaMA family: LLaMA, Qwen2, Qwen3, Mistral (grouped-query attention).

Pre-LN blocks. One attention unit = one key/value head and the `heads_per_group` query
heads that share it; in q_proj/o_proj those query heads are contiguous (repeat_kv maps
query head h to KV head h // heads_per_group). MLP units are SwiGLU channels: a row of
gate_proj and up_proj and a column of down_proj.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import Adapter, Block, UnitGroup
from .bert import _cols, _rows


class LlamaAdapter(Adapter):
    def __init__(self):
        super().__init__(family="LLaMA", model_types=("llama", "qwen2", "qwen3", "mistral"),
                         lora_targets=("q_proj", "k_proj", "v_proj", "o_proj",
                                       "gate_proj", "up_proj", "down_proj"))

    def base(self, model):
        return model.base_model

    def layers(self, model):
        return self.base(model).layers

    def _replace_layers(self, model, new):
        self.base(model).layers = new

    def block(self, model, i):
        layer = self.layers(model)[i]
        sa = layer.self_attn
        hd, qpk = sa.head_dim, sa.num_key_value_groups
        n_groups = sa.k_proj.out_features // hd
        group = qpk * hd  # query rows per KV group
        attn = UnitGroup("attention", n_groups,
                         _rows(sa.q_proj, group, per_head=True) + _rows(sa.k_proj, hd)
                         + _rows(sa.v_proj, hd) + _cols(sa.o_proj, group, per_head=True),
                         out_module=sa.o_proj, act_unit_size=group)
        mlp_m = layer.mlp
        mlp = UnitGroup("mlp", mlp_m.up_proj.out_features,
                        _rows(mlp_m.gate_proj, 1) + _rows(mlp_m.up_proj, 1) + _cols(mlp_m.down_proj, 1),
                        out_module=mlp_m.down_proj, act_unit_size=1)
        return Block(i, layer, attn, mlp, heads_per_group=qpk, head_dim=hd,
                     mid_module=sa, mid_adds_input=True)

    def update_config(self, model):
        w = self.uniform_widths(model)
        if w is None:
            return False
        b = self.block(model, 0)
        cfg = model.config
        cfg.head_dim = b.head_dim  # keep rotary/attention sizes independent of head count
        cfg.num_key_value_heads, cfg.intermediate_size = w
        cfg.num_attention_heads = cfg.num_key_value_heads * b.heads_per_group
        return True

    def enable_output_bias(self, model):
        """LLaMA's config can say attention_bias / mlp_bias (biases on q, k, v, o / gate, up,
        down): switch both on and add zero biases where missing, so that a saved model loads
        with from_pretrained. Qwen2/3 and Mistral have no such flag for o_proj: left as they are."""
        if model.config.model_type != "llama":
            return super().enable_output_bias(model)
        for layer in self.layers(model):
            sa, mlp = layer.self_attn, layer.mlp
            for m in (sa.q_proj, sa.k_proj, sa.v_proj, sa.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
                if m.bias is None:
                    w = m.weight
                    m.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device),
                                          requires_grad=w.requires_grad)
        model.config.attention_bias = model.config.mlp_bias = True
        return True
