"""Configuration of a model structurally pruned by Pruning Explorer, whose layers have their own
widths (attention heads / KV groups, FFN neurons). Written by the explorer next to the weights
and named in config.json's `auto_map`; it imports nothing but transformers.

The config is the base architecture's own config with the per-layer widths added:
  * LLaMA family (LLaMA, Qwen2, Qwen3, Mistral): transformers' `per_layer_config`, one entry per
    layer with its `num_attention_heads`, `num_key_value_heads` and `intermediate_size` (the
    global values are the unpruned model's and are not used by any layer);
  * BERT, DistilBERT, GPT-2 (the head size is hidden_size / num_heads in their configs, so a
    per-layer head count cannot be written there): `pruned_layer_heads`, `pruned_layer_ffn`,
    `pruned_head_dim` and, where the hidden size was pruned, `pruned_head_width` (the width of
    the pooler / pre-classifier output, which kept the unpruned hidden size).
`pruned_family` says which; `pruned_base_model_type` is the transformers model type it extends.
"""


class PrunedConfigMixin:
    """Validation for per-layer widths: transformers' own checks, less LLaMA's "hidden size a
    multiple of the head count", which no layer needs here (every layer has an explicit head_dim);
    per layer, the query heads must fill whole KV groups."""

    def validate(self):
        for check in getattr(type(self), "__class_validators__", []):
            if check.__name__ != "validate_architecture":
                check(self)
        layers = list(self.per_layer_config) if getattr(self, "is_heterogeneous", False) else []
        for i, layer in enumerate(layers):
            heads, kv = layer.num_attention_heads, layer.num_key_value_heads
            if heads < 1 or kv < 1 or heads % kv:
                raise ValueError(f"layer {i}: {heads} query heads cannot share {kv} KV heads evenly")
        for name in ("pruned_layer_heads", "pruned_layer_ffn"):
            widths = getattr(self, name, None)
            if widths is not None and len(widths) != self.num_hidden_layers:
                raise ValueError(f"{name} has {len(widths)} entries for {self.num_hidden_layers} layers")


# --- classes (generated) ---
