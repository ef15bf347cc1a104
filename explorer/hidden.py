"""Hidden-size ("embedding channel") pruning, Minitron style: remove residual-stream channels.

Channel c of the residual stream is written by the embeddings and by every block's output
projections, read by every block's input projections and by the head, and normalised by every
norm. Removing a set of channels therefore shrinks, together (H = hidden size, h = kept):

  * the embeddings (V, H) -> (V, h): tokens, and BERT's positions / token types; GPT-2's wpe;
  * every block's input projections, input columns: LLaMA q/k/v_proj, gate/up_proj; BERT
    query/key/value, intermediate.dense; DistilBERT q/k/v_lin, lin1; GPT-2 c_attn, c_fc;
  * every block's output projections, output rows and bias: LLaMA o_proj, down_proj; BERT
    attention.output.dense, output.dense; DistilBERT out_lin, lin2; GPT-2 attn/mlp c_proj;
  * every norm over the hidden size (weight and bias) and the final norm;
  * the head's input columns: the LM head (tied to the embeddings where it was: it stays tied),
    a sequence-classification `score`; BERT's pooler.dense and DistilBERT's pre_classifier;
  * config.hidden_size (and the modules' cached copies of it).

The attention head size does not change. LLaMA: config.head_dim is written explicitly, so the
saved config still says it (a uniform hidden-pruned LLaMA loads with plain `from_pretrained`).
BERT, DistilBERT and GPT-2 derive the head size from hidden_size / num_heads when they build a
model, so a config with the new hidden size cannot rebuild them: the plan file records
`hidden = {"dense": H0, "size": h}` and `models.load_model` builds the skeleton at H0 and cuts
it to the first h channels before loading the weights (`build_skeleton`).

Pooler decision (BERT; DistilBERT's pre_classifier alike): its *input* is the residual stream
at [CLS], so its input columns are pruned; its *output* is not a residual channel (a tanh
feature read only by the classifier, a different basis), so it keeps its dense width H0, and
the classifier is untouched. That keeps "removing = zeroing" exact up to the norms (pruning the
pooler's rows by the residual channel indices would drop unrelated features) and costs
H0·(H0 - h) parameters more than a square pooler.

What the norms make approximate. Removing channels equals zeroing them in the dense model
(zero embedding columns, output-projection rows and biases: the removed channels are then 0
all along the stream) exactly when every norm is the identity. With real norms:
  * RMSNorm (LLaMA): the statistic is mean(x²) over the channels, so over h channels instead
    of H it is H/h times larger for the same (zeroed) stream. `rescale_norms=True` (default)
    multiplies every norm weight by sqrt(H/h), which makes removal equal zeroing exactly (up
    to eps, which acts as eps·h/H). Against the *dense* model the remaining difference is only
    the removed channels' share of the energy in each token's mean square (1 + E_R/E_K in the
    variance); without the rescale every norm output would shrink by sqrt(h/H) instead.
  * LayerNorm (BERT, DistilBERT, GPT-2): mean and variance run over the kept channels, and a
    zeroed channel still moves the dense mean (μ·h/H per token): no static rescale makes it
    exact. The same sqrt(H/h) weight rescale is exact where a token's mean is 0 and removes
    most of the change otherwise. Pre-LN (GPT-2) adds one more term: a zero stream channel
    leaves its LayerNorm as b - μ·w/σ, which the next projections read and lose. The change is
    small when the removed channels carry little energy (what `hidden_salience` selects for);
    a reconstruction / recovery pass can absorb the rest.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .adapters import Adapter
from .adapters.base import sync_linear_attrs
from .adapters.bert import BertAdapter, DistilBertAdapter
from .adapters.gpt2 import GPT2Adapter
from .adapters.llama import LlamaAdapter
from .errors import DataError, ExplorerError, ModelError

try:
    from huggingface_hub.errors import StrictDataclassError  # what transformers' strict configs raise
except ImportError:  # an older huggingface_hub: the configs raise ValueError
    StrictDataclassError = ValueError


@dataclass
class HiddenSpec:
    """Where the residual channels sit in one model."""

    size: int  # current hidden size H
    cuts: list[tuple[nn.Module, str, int]] = field(default_factory=list)  # (module, param, dim of length H)
    norms: list[nn.Module] = field(default_factory=list)  # norms over H (salience hooks)
    attrs: list[tuple[object, str]] = field(default_factory=list)  # cached copies of H
    head_dim: int | None = None  # LLaMA: written into config.head_dim
    untouched: list[nn.Module] = field(default_factory=list)  # modules with parameters left as they are

    def add_in(self, m: nn.Module | None) -> None:
        """Input columns of a Linear (weight (out, in)) or a GPT-2 Conv1D (weight (in, out))."""
        if m is not None:
            self.cuts.append((m, "weight", 1 if isinstance(m, nn.Linear) else 0))

    def add_out(self, m: nn.Module) -> None:
        """Output rows of a Linear / Conv1D and its bias."""
        self.cuts.append((m, "weight", 0 if isinstance(m, nn.Linear) else 1))
        if m.bias is not None:
            self.cuts.append((m, "bias", 0))

    def add_embedding(self, m: nn.Module | None) -> None:
        if m is not None:
            self.cuts.append((m, "weight", 1))  # (num, H)

    def add_norm(self, m: nn.Module) -> None:
        """A norm over H (one replaced by nn.Identity, as in the tests, has nothing to cut)."""
        for name in ("weight", "bias"):
            if getattr(m, name, None) is not None:
                self.cuts.append((m, name, 0))
        self.norms.append(m)


def _check_class(model: nn.Module, allowed: tuple[str, ...], family: str) -> None:
    name = type(model).__name__
    if not any(name.endswith(a) for a in allowed):
        raise ModelError(f"hidden-size pruning supports {family} models as {', '.join(allowed)}, "
                         f"not {name}")


def _llama_spec(adapter: Adapter, model: nn.Module, spec: HiddenSpec) -> None:
    _check_class(model, ("ForCausalLM", "ForSequenceClassification", "Model"), "LLaMA-family")
    base = adapter.base(model)
    spec.head_dim = adapter.block(model, 0).head_dim
    spec.add_embedding(base.embed_tokens)
    for layer in adapter.layers(model):
        sa, mlp = layer.self_attn, layer.mlp
        spec.add_norm(layer.input_layernorm)
        for m in (sa.q_proj, sa.k_proj, sa.v_proj):
            spec.add_in(m)
        spec.add_out(sa.o_proj)  # (H, heads·head_dim)
        spec.add_norm(layer.post_attention_layernorm)
        spec.add_in(mlp.gate_proj)
        spec.add_in(mlp.up_proj)
        spec.add_out(mlp.down_proj)  # (H, F)
        spec.attrs += [(o, "hidden_size") for o in (layer, mlp) if hasattr(o, "hidden_size")]
        spec.untouched += [n for n in (getattr(sa, "q_norm", None), getattr(sa, "k_norm", None))
                           if n is not None]  # Qwen3: norms over head_dim
    spec.add_norm(base.norm)
    spec.add_in(getattr(model, "lm_head", None))  # (V, H), maybe the embeddings' own tensor
    spec.add_in(getattr(model, "score", None))


def _bert_spec(adapter: Adapter, model: nn.Module, spec: HiddenSpec) -> None:
    if model.config.model_type not in ("bert", "roberta", "xlm-roberta"):
        raise ModelError(f"hidden-size pruning is not implemented for {model.config.model_type} "
                         "(its embeddings may have their own size): bert, roberta and xlm-roberta are")
    _check_class(model, ("ForSequenceClassification", "Model"), "BERT-family")
    base = adapter.base(model)
    emb = base.embeddings
    for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        spec.add_embedding(getattr(emb, name, None))
    spec.add_norm(emb.LayerNorm)
    for layer in adapter.layers(model):
        sa = layer.attention.self
        for m in (sa.query, sa.key, sa.value):
            spec.add_in(m)
        spec.add_out(layer.attention.output.dense)
        spec.add_norm(layer.attention.output.LayerNorm)  # post-LN: its output is the stream
        spec.add_in(layer.intermediate.dense)
        spec.add_out(layer.output.dense)
        spec.add_norm(layer.output.LayerNorm)
    pooler = getattr(base, "pooler", None)
    if pooler is not None:
        spec.add_in(pooler.dense)  # (H0, H) -> (H0, h): the pooled features keep their width
    head = getattr(model, "classifier", None)
    if head is not None and hasattr(head, "out_proj"):  # RoBERTa's head reads the stream at <s>
        spec.add_in(head.dense)  # output kept, as BERT's pooler
        spec.untouched.append(head.out_proj)
    elif head is not None:
        spec.untouched.append(head)  # BERT's classifier reads the pooler's (dense) output


def _distilbert_spec(adapter: Adapter, model: nn.Module, spec: HiddenSpec) -> None:
    _check_class(model, ("ForSequenceClassification", "Model"), "DistilBERT")
    emb = adapter.base(model).embeddings
    spec.add_embedding(emb.word_embeddings)
    spec.add_embedding(emb.position_embeddings)
    spec.add_norm(emb.LayerNorm)
    for layer in adapter.layers(model):
        a = layer.attention
        for m in (a.q_lin, a.k_lin, a.v_lin):
            spec.add_in(m)
        spec.add_out(a.out_lin)
        spec.add_norm(layer.sa_layer_norm)
        spec.add_in(layer.ffn.lin1)
        spec.add_out(layer.ffn.lin2)
        spec.add_norm(layer.output_layer_norm)
        spec.attrs.append((a, "dim"))
    spec.add_in(getattr(model, "pre_classifier", None))  # output kept, as BERT's pooler
    if getattr(model, "classifier", None) is not None:
        spec.untouched.append(model.classifier)


def _gpt2_spec(adapter: Adapter, model: nn.Module, spec: HiddenSpec) -> None:
    _check_class(model, ("LMHeadModel", "ForSequenceClassification", "Model"), "GPT-2")
    base = adapter.base(model)
    spec.add_embedding(base.wte)
    spec.add_embedding(base.wpe)
    spec.attrs.append((base, "embed_dim"))
    for layer in adapter.layers(model):
        if hasattr(layer, "crossattention"):
            raise ModelError("hidden-size pruning does not support GPT-2 with cross-attention")
        spec.add_norm(layer.ln_1)
        spec.add_in(layer.attn.c_attn)  # Conv1D (H, 3E')
        spec.add_out(layer.attn.c_proj)  # Conv1D (E', H)
        spec.add_norm(layer.ln_2)
        spec.add_in(layer.mlp.c_fc)
        spec.add_out(layer.mlp.c_proj)
        spec.attrs.append((layer.attn, "embed_dim"))
    spec.add_norm(base.ln_f)
    spec.add_in(getattr(model, "lm_head", None))
    spec.add_in(getattr(model, "score", None))


def hidden_spec(adapter: Adapter, model: nn.Module) -> HiddenSpec:
    """Every parameter dimension of length H that indexes the residual channels, the norms over
    them and the attributes caching H. Raises ModelError for an architecture or head it does
    not know, and checks that it covers every parameter it does not leave alone on purpose."""
    spec = HiddenSpec(int(model.config.hidden_size))
    if isinstance(adapter, LlamaAdapter):
        _llama_spec(adapter, model, spec)
    elif isinstance(adapter, DistilBertAdapter):  # before BertAdapter: a subclass of it
        _distilbert_spec(adapter, model, spec)
    elif isinstance(adapter, BertAdapter):
        _bert_spec(adapter, model, spec)
    elif isinstance(adapter, GPT2Adapter):
        _gpt2_spec(adapter, model, spec)
    else:
        raise ModelError(f"hidden-size pruning is not implemented for the {adapter.family} family")
    known = {id(m) for m, _, _ in spec.cuts} | {id(m) for m in spec.untouched}
    for name, m in model.named_modules():
        if id(m) not in known and any(True for _ in m.parameters(recurse=False)):
            raise ModelError(f"hidden-size pruning does not know how to handle '{name}' "
                             f"({type(m).__name__}) of this {type(model).__name__}")
    for m, name, dim in spec.cuts:
        p = getattr(m, name)
        assert p.shape[dim] == spec.size, \
            f"{type(m).__name__}.{name} {tuple(p.shape)} has no hidden dim {spec.size} at {dim}"
    return spec


def config_valid(config) -> bool:
    """Whether transformers' own validation accepts `config` (LlamaConfig, for one, wants
    hidden_size to be a multiple of num_attention_heads even with an explicit head_dim; a
    config that fails cannot be saved nor loaded)."""
    validate = getattr(config, "validate", None)
    if validate is None:
        return True
    try:
        validate()
    except (ValueError, TypeError, StrictDataclassError):
        return False
    return True


def hidden_multiple(config) -> int:
    """What the kept channel count must be a multiple of for `config` to stay valid: the
    attention head count for LLaMA-family configs (see `config_valid`), else 1."""
    if config.model_type in LlamaAdapter().model_types:
        return int(config.num_attention_heads)
    return 1


def _check_config(model: nn.Module, h: int, head_dim: int | None) -> None:
    cfg = copy.deepcopy(model.config)
    cfg.hidden_size = h
    if head_dim is not None:
        cfg.head_dim = head_dim
    if not config_valid(cfg):
        m = hidden_multiple(model.config)
        raise ExplorerError(f"a {model.config.model_type} config cannot say hidden_size={h}"
                            + (f": keep a multiple of num_attention_heads ({m})" if m > 1 else ""))


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # tied tensors once


def _keep_list(keep, size: int) -> list[int]:
    if isinstance(keep, torch.Tensor):
        keep = keep.flatten().tolist()
    out = sorted(set(int(k) for k in keep))
    if not out:
        raise ExplorerError("hidden-size pruning must keep at least one channel")
    if out[0] < 0 or out[-1] >= size:
        raise ExplorerError(f"channel indices must lie in 0..{size - 1}, got {out[0]}..{out[-1]}")
    return out


@torch.no_grad()
def cut_hidden(adapter: Adapter, model: nn.Module, keep, rescale_norms: bool = True) -> dict:
    """Keep the residual channels `keep` (indices into 0..H-1; sorted and deduplicated) of
    `model`, in place, removing the others from every coupled parameter (see the module
    docstring); tied tensors stay tied. With `rescale_norms`, every norm's weight (not its
    bias) is multiplied by sqrt(H/h): for RMSNorm that makes removal equal zeroing exactly, for
    LayerNorm approximately (exactly where a token's mean over the channels is 0). Sets
    config.hidden_size (and config.head_dim for LLaMA). Returns {"before": H, "after": h}.
    Gradients and optimiser state do not survive. Model-level: `prune_hidden` also records
    the change in the LoadedModel's plan for saving."""
    spec = hidden_spec(adapter, model)
    H = spec.size
    keep = _keep_list(keep, H)
    h = len(keep)
    _check_config(model, h, spec.head_dim)  # before any change: the model stays as it was
    params_before = _n_params(model)
    # one entry per tensor, so that a tied LM head / embedding is cut once and stays shared
    by_tensor: dict[int, tuple[nn.Parameter, int, list[tuple[nn.Module, str]]]] = {}
    for m, name, dim in spec.cuts:
        p = getattr(m, name)
        if id(p) in by_tensor:
            assert by_tensor[id(p)][1] == dim, f"tied tensor cut along two dims ({type(m).__name__}.{name})"
            by_tensor[id(p)][2].append((m, name))
        else:
            by_tensor[id(p)] = (p, dim, [(m, name)])
    removed = sum(p.numel() // H * (H - h) for p, _, _ in by_tensor.values())
    idx_cpu = torch.tensor(keep, dtype=torch.long)
    for p, dim, owners in by_tensor.values():
        old_shape = list(p.shape)  # [..., H, ...]
        new = p.data.index_select(dim, idx_cpu.to(p.device)).contiguous()  # [..., h, ...]
        expected = old_shape[:dim] + [h] + old_shape[dim + 1:]
        assert list(new.shape) == expected, (owners[0][1], tuple(new.shape), expected)
        param = nn.Parameter(new, requires_grad=p.requires_grad)
        for m, name in owners:
            setattr(m, name, param)
    if rescale_norms and h < H:
        scale = math.sqrt(H / h)  # mean(x²) over h channels of a stream whose others are 0
        for m in spec.norms:  # RMSNorm: exact; LayerNorm: exact where the token's mean is 0
            if getattr(m, "weight", None) is not None:
                m.weight.mul_(scale)
    for m, _, _ in spec.cuts:
        if isinstance(m, nn.Embedding):
            m.embedding_dim = h
        elif isinstance(m, nn.LayerNorm):
            m.normalized_shape = (h,)
        elif isinstance(m, nn.Linear) or hasattr(m, "nf"):
            sync_linear_attrs(m)
    for obj, attr in spec.attrs:
        assert getattr(obj, attr) == H, (type(obj).__name__, attr, getattr(obj, attr), H)
        setattr(obj, attr, h)
    if spec.head_dim is not None:
        model.config.head_dim = spec.head_dim  # no longer hidden_size // num_attention_heads
    model.config.hidden_size = h
    after = hidden_spec(adapter, model)  # re-derives every coupled dim: all must be h now
    assert after.size == h
    assert _n_params(model) == params_before - removed, (_n_params(model), params_before, removed)
    return {"before": H, "after": h}


def prune_hidden(lm, keep: list[int] | torch.Tensor, rescale_norms: bool = True) -> None:
    """Physically remove every residual channel not in `keep` (indices into 0..H-1) from
    `lm.model`, in place (see `cut_hidden`), and record `lm.plan["hidden"] = {"dense": H0,
    "size": h}` (H0 the size before the first hidden cut), which `models.save_model` writes
    so that `load_model` rebuilds the same shapes. Keeping every channel is the identity."""
    res = cut_hidden(lm.adapter, lm.model, keep, rescale_norms=rescale_norms)
    dense = int((lm.plan.get("hidden") or {}).get("dense", res["before"]))
    lm.plan["hidden"] = {"dense": dense, "size": res["after"]}


@torch.no_grad()
def hidden_salience(lm, texts: list[str], batch_size: int = 8, max_length: int | None = None) -> torch.Tensor:
    """Minitron's activation criterion for the residual channels: for every norm over the
    hidden size (LLaMA: input/post-attention RMSNorms of each block and the final norm; BERT:
    the embedding LayerNorm and both post-LNs of each block, whose outputs are the stream),
    the mean over the calibration tokens (padding excluded) of |norm output| per channel,
    summed over the norms. Forward hooks, no gradients, accumulated in float32 on the model's
    device. Returns a float32 tensor of shape (H,) on the CPU; higher = more salient."""
    if not texts:
        raise DataError("hidden-size salience needs calibration texts")
    model = lm.model
    spec = hidden_spec(lm.adapter, model)
    H = spec.size
    dev = next(model.parameters()).device
    total = torch.zeros(H, dtype=torch.float32, device=dev)
    mask_now: list[torch.Tensor] = []

    def hook(module, args, out):
        x = out[0] if isinstance(out, tuple) else out  # (B, T, H)
        m = mask_now[0]  # (B, T)
        assert x.shape[-1] == H and tuple(x.shape[:2]) == tuple(m.shape), (tuple(x.shape), tuple(m.shape), H)
        total.add_(torch.einsum("bth,bt->h", x.detach().float().abs(), m))

    handles = [n.register_forward_hook(hook) for n in spec.norms]
    was_training = model.training
    model.eval()
    tokens = 0.0
    try:
        for _, batch in lm.forward_batches(texts, batch_size, max_length):
            mask = batch["attention_mask"].to(device=dev, dtype=torch.float32)
            mask_now[:] = [mask]
            tokens += float(mask.sum())
            model(**batch)
    finally:
        for hd in handles:
            hd.remove()
        model.train(was_training)
    if tokens == 0:
        raise DataError("the calibration texts have no tokens")
    return (total / tokens).cpu()


def channels_to_keep(salience: torch.Tensor, n_keep: int) -> list[int]:
    """The `n_keep` most salient channels (ties to the lower index), sorted."""
    order = torch.sort(-salience.double(), stable=True).indices
    return sorted(int(i) for i in order[:n_keep])


def keep_count(size: int, fraction: float, round_to: int = 1) -> int:
    """Channels kept when removing `fraction` of `size`: size·(1-fraction) rounded to the
    nearest multiple of `round_to` (at least round_to, at most size); fraction 0 keeps all."""
    if not (isinstance(fraction, (int, float)) and math.isfinite(fraction) and 0 <= fraction < 1):
        raise ExplorerError(f"hidden-size pruning fraction must be in [0, 1), got {fraction}")
    if not (isinstance(round_to, int) and round_to >= 1):
        raise ExplorerError(f"round_to must be a positive integer, got {round_to}")
    if fraction == 0:
        return size
    n = int(round(size * (1 - fraction) / round_to)) * round_to
    return max(min(round_to, size), min(size, n))


def prune_hidden_fraction(lm, fraction: float, texts: list[str], round_to: int = 1, batch_size: int = 8,
                          max_length: int | None = None, rescale_norms: bool = True) -> dict:
    """Remove `fraction` of the residual channels, the least salient by `hidden_salience` on
    `texts` (calibration texts: `batch_size`, `max_length` as there), in place. The kept count
    is a multiple of `round_to` (e.g. 8 or 64 for fast matmuls) and of what the config needs
    (`hidden_multiple`: LLaMA's num_attention_heads), nearest to H·(1-fraction).
    `rescale_norms`: see `cut_hidden`. Returns a report: hidden_before / hidden_after,
    removed_fraction (actual), multiple (the rounding used), kept (channel indices into the old
    stream), removed_salience_share (share of the summed salience the removed channels had),
    params_before / params_after, block_params_before / _after, seconds. Raises ExplorerError
    for a fraction outside [0, 1) or one that the rounding turns into no cut at all."""
    t0 = time.perf_counter()
    H = int(lm.model.config.hidden_size)
    step = math.lcm(int(round_to), hidden_multiple(lm.model.config)) if isinstance(round_to, int) else round_to
    n_keep = keep_count(H, fraction, step)
    if fraction > 0 and n_keep == H:
        raise ExplorerError(f"removing {fraction:.1%} of {H} channels in multiples of {step} removes none: "
                            "use a larger fraction or a smaller round_to")
    params_before, block_before = lm.n_params, lm.block_params
    sal = hidden_salience(lm, texts, batch_size=batch_size, max_length=max_length)
    keep = channels_to_keep(sal, n_keep)
    prune_hidden(lm, keep, rescale_norms=rescale_norms)
    total = float(sal.sum())
    return {"hidden_before": H, "hidden_after": n_keep, "removed_fraction": 1 - n_keep / H,
            "multiple": step, "kept": keep, "removed_salience_share": (1 - float(sal[keep].sum()) / total) if total > 0 else 0.0,
            "params_before": params_before, "params_after": lm.n_params,
            "block_params_before": block_before, "block_params_after": lm.block_params,
            "seconds": time.perf_counter() - t0}


# --- saving and reloading ----------------------------------------------------------------

def hidden_record(lm) -> dict | None:
    """{"dense": H0, "size": h} for the plan file if the hidden size was pruned, else None.
    From `lm.plan` (prune_hidden); for a model cut with `cut_hidden` alone, inferred where the
    config allows (families whose head size is hidden / num_heads)."""
    cfg = lm.model.config
    size = int(cfg.hidden_size)
    rec = lm.plan.get("hidden")
    if rec:
        dense = int(rec["dense"])
    elif isinstance(lm.adapter, LlamaAdapter):
        dense = size  # an explicit head_dim: the config rebuilds it as it is
    elif getattr(cfg, "num_attention_heads", None):
        b = lm.adapter.block(lm.model, 0)
        dense = int(cfg.num_attention_heads) * b.head_dim  # never changed by head pruning here
    else:
        dense = size
    return None if dense == size else {"dense": dense, "size": size}


def plain_loadable(lm) -> bool:
    """Whether the hidden size lets the saved config rebuild the model with plain
    `from_pretrained`: always for LLaMA (explicit head_dim); not for BERT/DistilBERT/GPT-2
    once the hidden size is pruned (head size = hidden / heads; a dense-width pooler)."""
    return hidden_record(lm) is None or isinstance(lm.adapter, LlamaAdapter)


def build_skeleton(cls, config, adapter: Adapter, hidden: dict | None, dtype: torch.dtype | None = None) -> nn.Module:
    """A fresh model `cls.from_config(config)` at the pruned hidden size `hidden["size"]`
    (= config.hidden_size): built at hidden["dense"], where the config's head count still
    gives the real head size, then cut to the first `size` channels (random weights, to be
    overwritten by a state dict). `hidden=None` builds it as the config says."""
    kw = {"dtype": dtype} if dtype is not None else {}
    if not hidden or int(hidden["dense"]) == int(hidden["size"]):
        return cls.from_config(config, **kw)
    size = int(hidden["size"])
    assert int(config.hidden_size) == size, f"config hidden_size {config.hidden_size} != plan {size}"
    config.hidden_size = int(hidden["dense"])
    try:
        model = cls.from_config(config, **kw)
        cut_hidden(adapter, model, list(range(size)), rescale_norms=False)  # sets model.config's
    finally:
        config.hidden_size = size
    assert int(model.config.hidden_size) == size
    return model


def fresh_like(lm, config=None) -> nn.Module:
    """A randomly initialised model of `lm`'s architecture, dtype and hidden size (`config`: a changed
    copy of its config, e.g. with fewer layers), for timing references: at a pruned hidden size the
    config alone would give BERT / DistilBERT / GPT-2 the wrong head size, so it goes through
    build_skeleton."""
    cfg = config if config is not None else copy.deepcopy(lm.model.config)
    dtype = next(lm.model.parameters()).dtype
    return build_skeleton(_Direct(type(lm.model)), cfg, lm.adapter, hidden_record(lm), dtype=dtype)


class _Direct:
    """A model class with build_skeleton's `from_config` (as the Auto classes have it)."""

    def __init__(self, cls):
        self.cls = cls

    def from_config(self, config, dtype: torch.dtype | None = None) -> nn.Module:
        model = self.cls(config)
        return model if dtype is None else model.to(dtype)
