"""Modeling code of a model structurally pruned by Pruning Explorer: transformers' own classes,
each layer built at its own widths. Written by the explorer next to the weights and named in
config.json's `auto_map`; it imports nothing but the standard library, torch and transformers.

How a layer gets its widths (see configuration_pruned.py for where the config keeps them):
  * LLaMA family: transformers' own decoder layer class, built from the layer's entry of the
    config's `per_layer_config` (its head counts and FFN width);
  * BERT, DistilBERT, GPT-2: transformers' own layer, whose projections are then made at the
    layer's widths (query/key/value and output projection: heads x head_dim; FFN: its neurons),
    with the attention module's head count, head size and scaling set to match.
The model is first built as transformers builds it (on the meta device inside `from_pretrained`,
so the unpruned layers cost no memory there), then its layers are replaced or resized, then the
safetensors weights load as usual.
"""
import contextlib

import transformers
from torch import nn
from transformers import AutoModel
from transformers.pytorch_utils import Conv1D
from transformers.utils import logging


@contextlib.contextmanager
def _unpruned_build(config):
    """What transformers' own `__init__` needs to build the model before its layers get their
    widths: with per-layer widths (LLaMA family), leave to read the global (unpruned) ones; for
    BERT, DistilBERT and GPT-2, one head per layer, since their layers check that the hidden size
    is a multiple of the head count, which a pruned hidden size need not be (the head size here
    is `pruned_head_dim`, not hidden / heads)."""
    if getattr(config, "is_heterogeneous", False) and config.allow_global_per_layer_attribute_access:
        yield  # an outer build (a classifier around this base model) already allows it
    elif getattr(config, "is_heterogeneous", False):
        log = logging.get_logger("transformers.integrations.heterogeneity.configuration_utils")
        level = log.level
        log.setLevel(logging.ERROR)  # its warning is about exactly this read
        config.allow_global_per_layer_attribute_access = True
        try:
            yield
        finally:
            config.__dict__.pop("allow_global_per_layer_attribute_access", None)  # back to the default, unsaved
            log.setLevel(level)
    elif config.pruned_family == "llama":
        yield
    else:
        heads = config.num_attention_heads
        config.num_attention_heads = 1
        try:
            yield
        finally:
            config.num_attention_heads = heads


def _linear(old, n_in, n_out):
    """A Linear like `old` (bias, dtype, device) of another shape."""
    w = old.weight
    return nn.Linear(n_in, n_out, bias=old.bias is not None, device=w.device, dtype=w.dtype)


def _conv1d(old, n_in, n_out):
    """GPT-2's Conv1D (weight (in, out)) like `old`, of another shape."""
    return Conv1D(n_out, n_in).to(device=old.weight.device, dtype=old.weight.dtype)


def _llama_layers(model, config):
    if not hasattr(type(config), "per_layer_config"):
        raise ImportError(f"this model's layers are described by transformers' per_layer_config, which "
                          f"transformers {transformers.__version__} lacks: install transformers >= 5.25")
    base = model.base_model
    layer_cls = type(base.layers[0])
    base.layers = nn.ModuleList(layer_cls(config.per_layer_config[i], i) for i in range(config.num_hidden_layers))


def _bert_layers(model, config):
    base, h, d = model.base_model, config.hidden_size, config.pruned_head_dim
    for layer, n, f in zip(base.encoder.layer, config.pruned_layer_heads, config.pruned_layer_ffn):
        sa = layer.attention.self
        for name in ("query", "key", "value"):
            setattr(sa, name, _linear(getattr(sa, name), h, n * d))
        sa.num_attention_heads, sa.attention_head_size, sa.all_head_size, sa.scaling = n, d, n * d, d ** -0.5
        layer.attention.output.dense = _linear(layer.attention.output.dense, n * d, h)
        layer.intermediate.dense = _linear(layer.intermediate.dense, h, f)
        layer.output.dense = _linear(layer.output.dense, f, h)
    width = getattr(config, "pruned_head_width", None)  # the hidden size was pruned: the pooler kept its width
    if width:
        if getattr(base, "pooler", None) is not None:
            base.pooler.dense = _linear(base.pooler.dense, h, width)
        head = getattr(model, "classifier", None)
        if isinstance(head, nn.Linear):  # BERT: reads the pooler's output
            model.classifier = _linear(head, width, head.out_features)
        elif head is not None and hasattr(head, "out_proj"):  # RoBERTa: reads the stream at <s>
            head.dense = _linear(head.dense, h, width)
            head.out_proj = _linear(head.out_proj, width, head.out_proj.out_features)


def _distilbert_layers(model, config):
    base, h, d = model.base_model, config.hidden_size, config.pruned_head_dim
    for layer, n, f in zip(base.transformer.layer, config.pruned_layer_heads, config.pruned_layer_ffn):
        a = layer.attention
        for name in ("q_lin", "k_lin", "v_lin"):
            setattr(a, name, _linear(getattr(a, name), h, n * d))
        a.out_lin = _linear(a.out_lin, n * d, h)
        a.n_heads, a.attention_head_size, a.scaling = n, d, d ** -0.5
        layer.ffn.lin1 = _linear(layer.ffn.lin1, h, f)
        layer.ffn.lin2 = _linear(layer.ffn.lin2, f, h)
    width = getattr(config, "pruned_head_width", None)
    if width and getattr(model, "pre_classifier", None) is not None:
        model.pre_classifier = _linear(model.pre_classifier, h, width)
        model.classifier = _linear(model.classifier, width, model.classifier.out_features)


def _gpt2_layers(model, config):
    base, h, d = model.base_model, config.hidden_size, config.pruned_head_dim
    for layer, n, f in zip(base.h, config.pruned_layer_heads, config.pruned_layer_ffn):
        a = layer.attn
        a.c_attn = _conv1d(a.c_attn, h, 3 * n * d)
        a.c_proj = _conv1d(a.c_proj, n * d, h)
        a.num_heads, a.head_dim, a.split_size = n, d, n * d
        a.scaling = d ** -0.5 if a.scale_attn_weights else 1.0
        if a.scale_attn_by_inverse_layer_idx:
            a.scaling /= float(a.layer_idx + 1)
        layer.mlp.c_fc = _conv1d(layer.mlp.c_fc, h, f)
        layer.mlp.c_proj = _conv1d(layer.mlp.c_proj, f, h)


BUILD = {"llama": _llama_layers, "bert": _bert_layers, "distilbert": _distilbert_layers, "gpt2": _gpt2_layers}


BASE_MODEL = None  # the generated bare model class, set at the end of the file


class PrunedModelMixin:
    """Put before a transformers model class: builds it, then gives every layer its widths."""

    def __init__(self, config, *args, **kwargs):
        if BASE_MODEL is not None and type(self) is not BASE_MODEL:
            # transformers' generic classifiers (LLaMA family) build their base model with
            # AutoModel.from_config(config): for this config class (only), that is the pruned one
            AutoModel.register(type(config), BASE_MODEL, exist_ok=True)
        with _unpruned_build(config):
            super().__init__(config, *args, **kwargs)
        base = self.base_model
        if base is self or not isinstance(base, PrunedModelMixin):  # else its layers have their widths already
            BUILD[config.pruned_family](self, config)
        self.post_init()  # initialises the new modules (when not loading) and refreshes what it derives

    def set_attn_implementation(self, *args, **kwargs):
        """transformers' own, then the same for the layers' own configs (LLaMA family: copies taken
        from `per_layer_config`, which transformers does not reach)."""
        out = super().set_attn_implementation(*args, **kwargs)
        impl = self.base_model.config._attn_implementation
        for m in self.base_model.modules():
            cfg = getattr(m, "config", None)
            if cfg is not None and cfg is not self.base_model.config and hasattr(cfg, "pruned_family"):
                cfg._attn_implementation = impl
        return out


# --- classes (generated) ---
