"""GPT-2. Pre-LN blocks; fused QKV projection `c_attn` as a transformers `Conv1D`, whose
weight is stored transposed: (in, out). So output units lie along weight dim 1 and the
q, k and v sections sit side by side at offsets 0, E', 2E' (E' = current heads x head_dim).
"""
from __future__ import annotations

from .base import Adapter, Block, ParamSlice, UnitGroup


class GPT2Adapter(Adapter):
    def __init__(self):
        super().__init__(family="GPT-2", model_types=("gpt2",),
                         lora_targets=("c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"))

    def base(self, model):
        return model.base_model

    def layers(self, model):
        return self.base(model).h

    def _replace_layers(self, model, new):
        self.base(model).h = new

    def block(self, model, i):
        layer = self.layers(model)[i]
        attn_m = layer.attn
        hd = attn_m.head_dim
        width = attn_m.c_proj.weight.shape[0]  # current heads * head_dim (c_proj is (E', E))
        n_heads = width // hd
        c_attn, c_proj = attn_m.c_attn, attn_m.c_proj
        slices = []
        for section in range(3):  # q, k, v
            off = section * width
            slices.append(ParamSlice(c_attn, "weight", 1, hd, offset=off))  # (in, 3E')
            slices.append(ParamSlice(c_attn, "bias", 0, hd, offset=off))  # (3E',)
        slices.append(ParamSlice(c_proj, "weight", 0, hd))  # (E', E)
        attn = UnitGroup("attention", n_heads, slices, out_module=c_proj, act_unit_size=hd)
        fc, proj = layer.mlp.c_fc, layer.mlp.c_proj
        mlp = UnitGroup("mlp", fc.weight.shape[1],
                        [ParamSlice(fc, "weight", 1, 1), ParamSlice(fc, "bias", 0, 1),
                         ParamSlice(proj, "weight", 0, 1)],
                        out_module=proj, act_unit_size=1)
        return Block(i, layer, attn, mlp, heads_per_group=1, head_dim=hd,
                     mid_module=layer.attn, mid_adds_input=True)

    def after_prune(self, block):
        a = block.module.attn
        a.num_heads = block.attn.n_units
        a.split_size = block.attn.n_units * block.head_dim

    def update_config(self, model):
        w = self.uniform_widths(model)
        if w is None or w[0] != model.config.n_head:
            return False
        model.config.n_inner = w[1]
        return True
