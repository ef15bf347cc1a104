"""Plotly figure builders for the explorer UI (and its HTML export).

Every builder is a pure function: plain numbers in (lists / numpy arrays / dicts),
a `go.Figure` out. Nothing here knows about Gradio, sessions or models, so the same
charts can be drawn from a saved report.
"""
from __future__ import annotations

import html
import textwrap
from typing import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
from plotly.subplots import make_subplots as _make_subplots

# One palette for the whole app: adaptive vs uniform and the sublayers keep their colours.
BLUE, ORANGE, GREEN, RED, PURPLE, GREY = "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#7f7f7f"
RUN_COLOURS = (BLUE, ORANGE, GREEN, RED, PURPLE, "#8c564b", "#e377c2", "#17becf", "#bcbd22", GREY)
HEIGHT = 380
_TEMPLATE: dict = {}


def _template() -> dict:
    if not _TEMPLATE:
        _TEMPLATE.update(pio.templates["plotly_white"].to_plotly_json())
    return _TEMPLATE


def _figure() -> go.Figure:
    """A new figure on the white template, without plotly's property validation: the
    validated path spends ~20 ms on the template alone (the tests check what the builders
    produce instead)."""
    return go.Figure(layout={"template": _template()}, _validate=False)


def make_subplots(**kw) -> go.Figure:
    return _make_subplots(figure=_figure(), **kw)


LEGEND_TOP = dict(orientation="h", yanchor="bottom", y=1.0, xanchor="right", x=1.0)
LEGEND_BELOW = dict(orientation="h", yanchor="top", y=-0.2, xanchor="left", x=0.0)  # clear of subplot titles


# the app shows each chart under a label chip at its top-left corner (gr.Plot's label, ~24 px high): the
# title starts below it
TITLE_PAD = 26
SUBTITLE_CHARS = 80  # a subtitle line at 11 px fits a half-width chart (≈ 600 px) at this many characters


def _layout(fig: go.Figure, title: str, height: int = HEIGHT, legend_below: bool = False,
            subtitle: str | Sequence[str] = "", **kw) -> go.Figure:
    """Title (one short line), an optional smaller subtitle (a text, or lines) wrapped to fit, legend,
    margins, height."""
    lines = [w for part in ([subtitle] if isinstance(subtitle, str) else subtitle) if part
             for w in textwrap.wrap(part, SUBTITLE_CHARS)]
    text = title + "".join(f"<br><span style='font-size:11px'>{html.escape(line, quote=False)}</span>"
                           for line in lines)
    # the app's plotly.js lifts a title of several lines by a few px a line: the pad grows with them
    pad = TITLE_PAD + 7 * len(lines)
    top = 60 + pad + 15 * len(lines)
    fig.update_layout(title=dict(text=text, x=0.01, y=1.0, yref="container", yanchor="top", pad=dict(t=pad),
                                 font=dict(size=15)),
                      height=height + (40 if legend_below else 0) + top - 60,
                      margin=dict(l=60, r=20, t=top + (20 if lines and not legend_below else 0),
                                  b=90 if legend_below else 50),
                      hovermode="closest", legend=LEGEND_BELOW if legend_below else LEGEND_TOP, **kw)
    return fig


def empty(message: str, height: int = 260) -> go.Figure:
    """A blank chart that says what to do to fill it."""
    fig = _figure()
    fig.add_annotation(text=message, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False,
                       font=dict(size=14, color=GREY))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return _layout(fig, "", height)


# --- importance ---------------------------------------------------------------------------

def layer_importance(layer_cos: Sequence[float], normalized: Sequence[float],
                     attn_cos: Sequence[float] | None = None, mlp_cos: Sequence[float] | None = None) -> go.Figure:
    """Left: raw cosine importance I_L of each block and of its attention / MLP sublayers
    (lines: the values sit close to -1, where bars from 0 would hide their differences).
    Right: normalised Î_L in [-1, 1] (what the allocation uses)."""
    layers = list(range(len(layer_cos)))
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.1,
                        subplot_titles=("raw I<sub>L</sub> = −cos(h<sub>in</sub>, h<sub>out</sub>)",
                                        "normalised Î<sub>L</sub>"))
    fig.add_scatter(x=layers, y=list(layer_cos), name="block I_L", mode="lines+markers", row=1, col=1,
                    line=dict(color=BLUE, width=3), marker=dict(size=9),
                    hovertemplate="layer %{x}<br>I_L = %{y:.4f}<extra>block</extra>")
    if attn_cos is not None:
        fig.add_scatter(x=layers, y=list(attn_cos), name="attention sublayer", mode="lines+markers", row=1, col=1,
                        line=dict(color=ORANGE, dash="dot"),
                        hovertemplate="layer %{x}<br>−cos(in, mid) = %{y:.4f}<extra>attention</extra>")
    if mlp_cos is not None:
        fig.add_scatter(x=layers, y=list(mlp_cos), name="MLP sublayer", mode="lines+markers", row=1, col=1,
                        line=dict(color=GREEN, dash="dot"),
                        hovertemplate="layer %{x}<br>−cos(mid, out) = %{y:.4f}<extra>MLP</extra>")
    norm = np.asarray(normalized, dtype=float)
    fig.add_bar(x=layers, y=norm.tolist(), name="Î_L", marker_color=[RED if v > 0 else GREY for v in norm],
                row=1, col=2, hovertemplate="layer %{x}<br>Î_L = %{y:.3f}<extra></extra>", showlegend=False)
    fig.update_xaxes(title_text="layer", dtick=1 if len(layers) <= 32 else None)
    fig.update_yaxes(title_text="importance", row=1, col=1)
    fig.update_yaxes(range=[-1.1, 1.1], row=1, col=2)
    return _layout(fig, "Layer importance (higher = the block changes its input more)", legend_below=True)


def _ragged(rows: Sequence[Sequence[float]]) -> np.ndarray:
    """Stack rows of different lengths into a (L, max_len) array padded with NaN."""
    width = max((len(r) for r in rows), default=0)
    out = np.full((len(rows), width), np.nan)
    for i, r in enumerate(rows):
        out[i, :len(r)] = np.asarray(r, dtype=float)
    return out


def _lists(a: np.ndarray) -> list:
    """Nested lists with None for gaps: plain JSON that every plotly.js reads the same way
    (numpy arrays would travel base64-encoded)."""
    return [[None if isinstance(v, float) and np.isnan(v) else v for v in row] for row in a.tolist()]


REL_MAX = 2.0  # heatmap colours: score ÷ layer mean, capped here (a few outlier units would wash out the rest)


def _per_row_mean(z: np.ndarray) -> np.ndarray:
    """Each row divided by its mean (gaps ignored): 1 = an average unit of that layer."""
    m = np.nanmean(z, axis=1, keepdims=True) if z.size else z
    m = np.where(np.isfinite(m) & (m > 0), m, 1.0)
    return z / m


def _colour_max(rel: np.ndarray) -> float:
    """Top of the colour scale: the 98th percentile of the data (never below 1.5 × the layer mean),
    so a few outlier units neither wash out the rest nor saturate half the map."""
    finite = rel[np.isfinite(rel)]
    return float(max(1.5, np.percentile(finite, 98))) if finite.size else REL_MAX


def _layer_axis(fig: go.Figure, n_layers: int) -> None:
    """Layers top to bottom, exactly the data's range, a readable tick step at 30+ layers."""
    fig.update_yaxes(title_text="layer", autorange=False, range=[n_layers - 0.5, -0.5],
                     dtick=1 if n_layers <= 16 else (2 if n_layers <= 40 else 5))


def heads_heatmap(heads: Sequence[Sequence[float]], metric: str = "", heads_per_group: int = 1) -> go.Figure:
    """Layers x query heads. Colour: score ÷ the layer's mean head score; hover: the raw score
    and, for grouped-query attention, the KV group (query heads of one group are pruned together;
    thin white lines separate the groups)."""
    raw = _ragged(heads)
    rel = _per_row_mean(raw)
    n_layers, n_heads = raw.shape
    g = max(1, int(heads_per_group))
    group = np.broadcast_to(np.arange(n_heads) // g, raw.shape)  # KV group of each query head
    custom = np.dstack([raw, group]) if raw.size else raw
    hover = "layer %{y}, head %{x}" + (", KV group %{customdata[1]}" if g > 1 else "")
    fig = _figure().add_trace(go.Heatmap(z=_lists(rel), customdata=_lists(custom), colorscale="Viridis", zmin=0,
                                         zmax=_colour_max(rel), x=list(range(n_heads)), y=list(range(n_layers)),
                                         colorbar=dict(title="× mean"), hoverongaps=False,
                                         hovertemplate=hover + "<br>score %{customdata[0]:.4g}"
                                                       "<br>%{z:.2f} × layer mean<extra></extra>"))
    for b in range(g, n_heads, g):  # KV-group boundaries
        fig.add_vline(x=b - 0.5, line=dict(color="white", width=2))
    fig.update_xaxes(title_text="query head" + (f" ({g} per KV group)" if g > 1 else ""),
                     dtick=1 if n_heads <= 32 else None, range=[-0.5, n_heads - 0.5])
    _layer_axis(fig, n_layers)
    return _layout(fig, f"Head salience ({metric}), relative to the layer's mean")


def bin_sorted(values: Sequence[float], bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sort descending and average into at most `bins` equal bins of consecutive ranks.
    Returns (mean, first rank, last rank) per bin."""
    v = np.sort(np.asarray(values, dtype=float))[::-1]
    n = len(v)
    k = min(bins, n)
    edges = np.linspace(0, n, k + 1).round().astype(int)
    means = np.array([v[a:b].mean() for a, b in zip(edges[:-1], edges[1:])])
    return means, edges[:-1], edges[1:] - 1


def neurons_heatmap(neurons: Sequence[Sequence[float]], metric: str = "", bins: int = 64) -> go.Figure:
    """Layers x FFN neurons, sorted by score (descending) within each layer and averaged
    into `bins` bins of ranks, so thousands of neurons stay readable. A steep fall from
    left to right means few neurons carry the layer."""
    binned = [bin_sorted(n, bins) for n in neurons]
    raw = _ragged([b[0] for b in binned])
    rel = _per_row_mean(raw)
    width = raw.shape[1]
    ranks = np.full(raw.shape, "", dtype=object)
    for i, (_, lo, hi) in enumerate(binned):
        ranks[i, :len(lo)] = [f"{a}–{b}" for a, b in zip(lo, hi)]
    custom = np.dstack([raw, ranks]) if raw.size else raw
    fig = _figure().add_trace(go.Heatmap(z=_lists(rel), customdata=_lists(custom), colorscale="Viridis", zmin=0,
                               zmax=_colour_max(rel), x=list(range(width)), y=list(range(raw.shape[0])),
                               colorbar=dict(title="× mean"),
                               hoverongaps=False,
                               hovertemplate="layer %{y}, neurons ranked %{customdata[1]}<br>mean score "
                                             "%{customdata[0]:.4g}<br>%{z:.2f} × layer mean<extra></extra>"))
    counts = sorted({len(n) for n in neurons})
    fig.update_xaxes(title_text=f"neuron rank bin (sorted by score, {width} bins of "
                                f"{'/'.join(str(c) for c in counts)} neurons)", range=[-0.5, width - 0.5])
    _layer_axis(fig, raw.shape[0])
    return _layout(fig, f"FFN neuron salience ({metric}), sorted within each layer, relative to its mean")


# --- allocation ---------------------------------------------------------------------------

DIFF_MORE, DIFF_LESS = "adaptive − uniform > 0", "adaptive − uniform < 0"  # red / green in every chart


def allocation_chart(adaptive: Sequence[float], uniform: Sequence[float], target: float,
                     clipped: Sequence[bool] = (), manual: Sequence[bool] = (),
                     normalized: Sequence[float] | None = None, title: str = "") -> go.Figure:
    """Per-layer sparsity S_L: the adaptive plan (with manual overrides) beside uniform S_base.
    Clipped layers get a red ▲, hand-set layers a purple ◆; Î_L on a second axis; below, the
    difference adaptive − uniform on its own scale, so that a small A is visible too.

    Redrawn on every slider move, so it is written as one plain figure dict (a few ms)
    rather than through plotly's validated object API (~50 ms on a busy 2-core machine)."""
    layers = list(range(len(adaptive)))
    ad = [float(v) for v in adaptive]
    data = [
        {"type": "bar", "x": layers, "y": ad, "name": "adaptive S_L", "marker": {"color": BLUE},
         "hovertemplate": "layer %{x}<br>S_L = %{y:.3f}<extra>adaptive</extra>"},
        {"type": "bar", "x": layers, "y": [float(v) for v in uniform], "name": "uniform S_base",
         "marker": {"color": "#aec7e8"}, "hovertemplate": "layer %{x}<br>S = %{y:.3f}<extra>uniform</extra>"},
    ]
    for flags, name, symbol, colour in ((clipped, "clipped", "triangle-up", RED),
                                        (manual, "set by hand", "diamond", PURPLE)):
        idx = [i for i, f in enumerate(flags) if f]
        if idx:
            data.append({"type": "scatter", "x": idx, "y": [ad[i] + 0.03 for i in idx], "mode": "markers",
                         "name": name, "marker": {"symbol": symbol, "size": 12, "color": colour},
                         "hovertemplate": "layer %{x}: " + name + "<extra></extra>"})
    top = max(1.0, max(ad, default=0.0) + 0.08)
    small = len(layers) <= 32
    layout = {
        "template": _template(), "height": HEIGHT, "barmode": "group", "hovermode": "closest",
        "title": {"text": title or "Per-layer sparsity", "x": 0.01, "y": 1.0, "yref": "container", "yanchor": "top",
                  "pad": {"t": TITLE_PAD}, "font": {"size": 15}},
        "margin": {"l": 60, "r": 60, "t": 60 + TITLE_PAD, "b": 50},
        "legend": {"orientation": "h", "yanchor": "bottom", "y": 1.0, "xanchor": "right", "x": 1.0},
        "xaxis": {"title": {"text": "layer"}, **({"dtick": 1} if small else {})},
        "yaxis": {"title": {"text": "sparsity S_L"}, "range": [0, top]},
        "shapes": [{"type": "line", "xref": "paper", "x0": 0, "x1": 1, "yref": "y", "y0": target, "y1": target,
                    "line": {"color": GREY, "dash": "dash", "width": 1}}],
    }
    diff = [a - float(u) for a, u in zip(ad, uniform)]
    if any(abs(d) > 1e-9 for d in diff):
        span = max(abs(d) for d in diff)
        for name, colour, keep in ((DIFF_MORE, RED, lambda d: d > 0), (DIFF_LESS, GREEN, lambda d: d <= 0)):
            # one fixed colour per series: a per-bar colour list gave the legend swatch the first bar's colour
            data.append({"type": "bar", "x": layers, "y": [d if keep(d) else None for d in diff], "name": name,
                         "yaxis": "y3", "offsetgroup": "diff", "marker": {"color": colour},
                         "hovertemplate": "layer %{x}<br>S_L − S_base = %{y:+.3f}<extra></extra>"})
        layout["yaxis"]["domain"] = [0.34, 1.0]
        layout["yaxis3"] = {"domain": [0.0, 0.24], "anchor": "x", "title": {"text": "Δ S_L"},
                            "range": [-1.15 * span, 1.15 * span], "zeroline": True, "zerolinecolor": GREY}
        layout["height"] = HEIGHT + 80
    if normalized is not None:
        data.append({"type": "scatter", "x": layers, "y": [float(v) for v in normalized], "mode": "lines+markers",
                     "name": "Î_L", "yaxis": "y2", "line": {"color": GREY, "dash": "dot"},
                     "hovertemplate": "layer %{x}<br>Î_L = %{y:.3f}<extra></extra>"})
        layout["yaxis2"] = {"title": {"text": "Î_L"}, "range": [-1.1, 1.1], "overlaying": "y", "side": "right",
                            "showgrid": False}
    return go.Figure({"data": data, "layout": layout}, _validate=False)


# --- pruning runs ---------------------------------------------------------------------------

def _quality_axis(metric: str) -> str:
    return {"accuracy": "accuracy", "perplexity": "perplexity (lower is better)"}.get(metric, metric or "quality")


PHASE_STYLE = {"cut": ("after the cut", "#d62728", "x"), "reconstructed": ("after reconstruction", "#ff7f0e", "diamond")}


def quality_range(values: Sequence[float | None], intervals: Sequence | None = None,
                  metric: str = "") -> list[float] | None:
    """A y-range for quality figures that neither hides nor invents differences: it holds every value and
    interval (the dense figure included), and spans at least twice the widest interval, so that points
    whose intervals overlap do not fill the axis (no 0.826–0.830 axis for noise). Without intervals the
    least span is 4 % of the value (accuracy: 4 points). Accuracy stays inside [0, 1]."""
    vs = [float(v) for v in values if v is not None and np.isfinite(v)]
    if not vs:
        return None
    ivs = [(float(lo), float(hi)) for lo, hi in (iv for iv in (intervals or []) if iv) if lo is not None]
    lo = min(vs + [a for a, _ in ivs])
    hi = max(vs + [b for _, b in ivs])
    widest = max((b - a for a, b in ivs), default=0.0)
    least = 2 * widest if widest > 0 else (0.04 if metric == "accuracy" else 0.04 * max(abs(v) for v in vs))
    span = max(hi - lo, least, 1e-6)
    mid = (lo + hi) / 2
    lo, hi = mid - span / 2, mid + span / 2
    pad = 0.08 * span
    lo, hi = lo - pad, hi + pad
    if metric == "accuracy":  # shift the window inside [0, 1] rather than cut it
        if hi > 1:
            lo, hi = lo - (hi - 1), 1.0
        if lo < 0:
            lo, hi = 0.0, min(1.0, hi - lo)
    return [lo, hi]


def _error_bars(ys: Sequence[float | None], intervals: Sequence | None) -> dict | None:
    """plotly error_y (asymmetric) for points with [lo, hi] intervals; None when no point has one."""
    if not intervals or not any(intervals):
        return None
    plus = [None if (iv is None or y is None) else max(0.0, iv[1] - y) for y, iv in zip(ys, intervals)]
    minus = [None if (iv is None or y is None) else max(0.0, y - iv[0]) for y, iv in zip(ys, intervals)]
    return dict(type="data", symmetric=False, array=plus, arrayminus=minus, thickness=1.5, width=4)


def quality_chart(dense: float | None, removed: Sequence[float], quality: Sequence[float], metric: str,
                  title: str = "", phases: Sequence[Mapping] | None = None, subtitle: str = "",
                  intervals: Sequence | None = None, notes: Sequence[str] | None = None) -> go.Figure:
    """Quality against the fraction of block parameters removed: the dense model at 0 and
    one labelled point per completed stage; `phases` (per stage {"cut": q, "reconstructed": q})
    adds the quality right after each stage's cut and after its reconstruction, at the same x.
    `intervals`: [lo, hi] (or None) per point, dense first, drawn as error bars; `notes`: per point,
    dense first, what else it has (its latency, or "not timed"), shown in its hover."""
    fig = _figure()
    extra = []
    for name, (label, color, symbol) in PHASE_STYLE.items():
        pts = [(x, ph[name]) for x, ph in zip(removed, phases or []) if ph and ph.get(name) is not None]
        if pts:
            extra += [q for _, q in pts]
            fig.add_scatter(x=[x for x, _ in pts], y=[q for _, q in pts], mode="markers", name=label,
                            marker=dict(size=10, color=color, symbol=symbol),
                            hovertemplate=label + "<br>removed %{x:.1%}<br>" + metric + " %{y:.4f}<extra></extra>")
    n = len(removed) + (dense is not None)
    ivs = list(intervals or [None] * n)[:n]
    ivs += [None] * (n - len(ivs))
    hover = list(notes or [""] * n)[:n]
    hover += [""] * (n - len(hover))
    hover = [html.escape(h) + (f"<br>95 % interval {iv[0]:.4g}–{iv[1]:.4g}" if iv else "") for h, iv in zip(hover, ivs)]
    d_iv, s_iv = (ivs[:1], ivs[1:]) if dense is not None else ([], ivs)
    d_note, s_note = (hover[:1], hover[1:]) if dense is not None else ([], hover)
    if dense is not None:
        fig.add_scatter(x=[0.0], y=[dense], mode="markers+text", name="dense", text=["dense"],
                        textposition="top center", marker=dict(size=12, color=GREY, symbol="star"),
                        error_y=_error_bars([dense], d_iv), customdata=d_note,
                        hovertemplate="dense<br>" + metric + " %{y:.4f}<br>%{customdata}<extra></extra>")
    if len(removed):
        xs = [0.0] + list(removed) if dense is not None else list(removed)
        ys = [dense] + list(quality) if dense is not None else list(quality)
        labels = ([""] if dense is not None else []) + [f"stage {i + 1}" for i in range(len(removed))]
        fig.add_scatter(x=xs, y=ys, mode="lines+markers+text", name="stages", text=labels,
                        textposition="bottom right", marker=dict(size=9, color=BLUE), line=dict(color=BLUE),
                        error_y=_error_bars(ys, [None] * len(d_iv) + s_iv),  # the dense point has its own
                        customdata=[""] * len(d_note) + s_note,
                        hovertemplate="%{text}<br>removed %{x:.1%}<br>" + metric
                                      + " %{y:.4f}<br>%{customdata}<extra></extra>")
    right = max([0.0, *removed]) * 1.15 + 0.04  # room for the labels on the last point
    fig.update_xaxes(title_text="block parameters removed", tickformat=".0%", range=[-0.02, right])
    rng = quality_range([dense, *quality, *extra], ivs, metric)
    if rng:
        fig.update_yaxes(range=rng)
    fig.update_yaxes(title_text=_quality_axis(metric))
    return _layout(fig, title or f"{metric or 'quality'} vs parameters removed", subtitle=subtitle)


def loss_chart(losses: Mapping[int, Sequence[float]], after_reconstruction: bool = False) -> go.Figure:
    """Recovery loss per optimiser step, one trace per stage, steps counted across stages
    (`after_reconstruction`: each stage's training followed a closed-form reconstruction, said in the title)."""
    fig = _figure()
    start = 0
    for i, (stage, ls) in enumerate(sorted(losses.items())):
        xs = list(range(start + 1, start + len(ls) + 1))
        fig.add_scatter(x=xs, y=list(ls), mode="lines+markers", name=f"stage {stage}", marker=dict(size=4),
                        line=dict(color=RUN_COLOURS[i % len(RUN_COLOURS)]),
                        hovertemplate=f"stage {stage}<br>step %{{x}}<br>loss %{{y:.4f}}<extra></extra>")
        start += len(ls)
    if start == 0:
        fig.add_annotation(text="no recovery steps (recovery 'none' or not started)", x=0.5, y=0.5, xref="paper",
                           yref="paper", showarrow=False, font=dict(color=GREY))
    fig.update_xaxes(title_text="recovery step")
    fig.update_yaxes(title_text="loss")
    return _layout(fig, "Recovery loss" + (" (training after each stage's reconstruction)" if after_reconstruction
                                           else ""))


def reconstruction_chart(reconstructions: Mapping[int, Mapping]) -> go.Figure:
    """What a reconstruction did (recovery "reconstruct": a closed-form refit of each cut block's output
    projections, no training steps): per layer, the calibration output error left after the refit as a
    share of the plain cut's, one bar series per stage (hover: both errors). Without per-layer errors, the
    stage's overall ratio. `reconstructions`: stage -> the stage record's `reconstruction`
    ({"error_ratio", "tokens", "seconds", "layer_errors": [[plain cut, after refit], ...]})."""
    fig = _figure()
    lines = []
    for i, (stage, rec) in enumerate(sorted(reconstructions.items())):
        colour = RUN_COLOURS[i % len(RUN_COLOURS)]
        errs = rec.get("layer_errors") or []
        pts = [(layer, cut, fit) for layer, (cut, fit) in enumerate(errs) if cut and cut > 0]
        if pts:
            fig.add_bar(x=[p[0] for p in pts], y=[p[2] / p[1] for p in pts], name=f"stage {stage}",
                        marker_color=colour, customdata=[[p[1], p[2]] for p in pts],
                        hovertemplate=f"stage {stage}, layer %{{x}}<br>error after the refit: %{{y:.1%}} of the "
                                      "plain cut's<br>(%{customdata[1]:.4g} vs %{customdata[0]:.4g})<extra></extra>")
        else:
            fig.add_bar(x=[f"stage {stage}"], y=[rec.get("error_ratio")], name=f"stage {stage}", marker_color=colour,
                        hovertemplate="%{x}: error after the refit %{y:.1%} of the plain cut's<extra></extra>")
        lines.append(f"stage {stage}: {rec.get('error_ratio', float('nan')):.0%} of the plain cut's error left, "
                     f"{rec.get('tokens', 0):,} calibration tokens, {rec.get('seconds', 0):.1f} s")
    if not reconstructions:
        fig.add_annotation(text="no reconstruction yet", x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False,
                           font=dict(color=GREY))
    per_layer = any(r.get("layer_errors") for r in reconstructions.values())
    fig.update_xaxes(title_text="layer" if per_layer else "", dtick=1 if per_layer else None)
    fig.update_yaxes(title_text="error after refit ÷ plain cut", tickformat=".0%", rangemode="tozero")
    fig.update_layout(barmode="group")
    return _layout(fig, "Reconstruction: closed-form refit, no training steps", subtitle=lines)


def stage_cost_chart(labels: Sequence[str], params: Sequence[float], latency_ms: Sequence[float | None],
                     not_timed: str = "latency not timed") -> go.Figure:
    """Parameters (bars, millions) and measured latency (line, ms) for dense and each stage; without any
    latency the chart says `not_timed` (instead of an empty latency axis)."""
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_bar(x=list(labels), y=[p / 1e6 for p in params], name="parameters (M)", marker_color="#aec7e8",
                hovertemplate="%{x}<br>%{y:.2f} M parameters<extra></extra>")
    lat = [None if v is None else float(v) for v in latency_ms]
    if any(v is not None for v in lat):
        fig.add_scatter(x=list(labels), y=lat, mode="lines+markers", name="latency (ms)", secondary_y=True,
                        line=dict(color=ORANGE), hovertemplate="%{x}<br>%{y:.1f} ms<extra></extra>")
        fig.update_yaxes(title_text="latency, ms (batch 32 × 128)", secondary_y=True, rangemode="tozero", showgrid=False)
    elif len(lat):
        fig.add_annotation(text="<br>".join(textwrap.wrap(not_timed, SUBTITLE_CHARS - 20)), x=0.5, y=1.0,
                           xref="paper", yref="paper", yanchor="bottom",
                           showarrow=False, font=dict(color=GREY))
    fig.update_yaxes(title_text="parameters (M)", secondary_y=False, rangemode="tozero")
    timed = any(v is not None for v in lat) or not len(lat)
    return _layout(fig, "Size and latency per stage" if timed else "Size per stage (not timed)")


def history_chart(runs: Sequence[Mapping], metric: str) -> go.Figure:
    """All runs of the session on one chart: each run a line from its dense point through
    its stages. `runs`: [{"label", "removed": [...], "quality": [...], "intervals"?: [[lo, hi] | None, ...]}]
    (removed includes 0); the y-range is `quality_range`'s (intervals widen it, never narrower than them)."""
    fig = _figure()
    for i, r in enumerate(runs):
        fig.add_scatter(x=list(r["removed"]), y=list(r["quality"]), mode="lines+markers", name=r["label"],
                        line=dict(color=RUN_COLOURS[i % len(RUN_COLOURS)]),
                        hovertemplate=html.escape(r["label"]) + "<br>removed %{x:.1%}<br>" + metric
                                      + " %{y:.4f}<extra></extra>")
    if not runs:
        fig.add_annotation(text="finished runs appear here", x=0.5, y=0.5, xref="paper", yref="paper",
                           showarrow=False, font=dict(color=GREY))
    fig.update_xaxes(title_text="block parameters removed", tickformat=".0%", rangemode="tozero")
    rng = quality_range([q for r in runs for q in r["quality"]], [iv for r in runs for iv in r.get("intervals") or []],
                        metric)
    if rng:
        fig.update_yaxes(range=rng)
    fig.update_yaxes(title_text=_quality_axis(metric))
    return _layout(fig, "Run history", legend_below=True, showlegend=True)


def search_curve(trials: Sequence[Mapping]) -> go.Figure:
    """A search's progress (AdaPruner's TPE): each trial's objective (markers, lower is better)
    and the best so far (a step line). `trials`: [{"trial", "value", "best_value"?, "params"?}]
    (the "trial" events or summary["trials"]); a missing best_value is the running minimum."""
    fig = _figure()
    pts = [t for t in trials if t.get("value") is not None and np.isfinite(t["value"])]
    if not pts:
        fig.add_annotation(text="no trials yet", x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False,
                           font=dict(color=GREY))
        return _layout(fig, "Search curve")
    xs = [int(t["trial"]) for t in pts]
    ys = [float(t["value"]) for t in pts]
    best = [float(t["best_value"]) if t.get("best_value") is not None else m
            for t, m in zip(pts, np.minimum.accumulate(ys))]
    text = ["<br>".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in (t.get("params") or {}).items())
            for t in pts]
    fig.add_scatter(x=xs, y=ys, mode="markers", name="trial", text=text, marker=dict(size=7, color=BLUE, opacity=0.6),
                    hovertemplate="trial %{x}<br>value %{y:.4f}<br>%{text}<extra></extra>")
    fig.add_scatter(x=xs, y=best, mode="lines", name="best so far", line=dict(color=ORANGE, width=3, shape="hv"),
                    hovertemplate="trial %{x}<br>best %{y:.4f}<extra></extra>")
    fig.update_xaxes(title_text="trial", rangemode="tozero")
    fig.update_yaxes(title_text="objective (val, lower is better)")
    return _layout(fig, f"Search curve: best {best[-1]:.4f} after {xs[-1]} trials")


def pareto_front(cost: Sequence[float], quality: Sequence[float], higher_is_better: bool = True) -> list[int]:
    """Indices of the points no other point beats on both cost (lower) and quality, sorted by cost."""
    c = np.asarray(cost, dtype=float)
    q = np.asarray(quality, dtype=float) * (1 if higher_is_better else -1)
    front, best = [], -np.inf
    for i in np.lexsort((-q, c)):  # by cost, then best quality first
        if np.isfinite(q[i]) and np.isfinite(c[i]) and q[i] > best:
            front.append(int(i))
            best = q[i]
    return front


def pareto_chart(points: Sequence[Mapping], metric: str) -> go.Figure:
    """Quality against parameters (left) and speed (right) for every stage of every run; the
    Pareto front (nothing both smaller/faster and better) is drawn as a line. Speed is the time
    per decoded token at batch 1 where it was measured (LMs), else the forward latency.
    `points`: [{"run", "model" (e.g. "stage 2"), "params", "latency_ms", "quality", "decode_tokens_per_s"?}]."""
    points = [dict(p, ms_per_token=1000 / p["decode_tokens_per_s"]) if p.get("decode_tokens_per_s") else p
              for p in points]
    speed_key, speed_title = (("ms_per_token", "ms per decoded token (batch 1)")
                              if any(p.get("ms_per_token") for p in points) else ("latency_ms", "latency (ms)"))
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.1, subplot_titles=("vs parameters", "vs speed"))
    higher = metric != "perplexity"
    runs = list(dict.fromkeys(p["run"] for p in points))
    for col, key, scale in ((1, "params", 1e6), (2, speed_key, 1.0)):
        pts = [p for p in points if p.get(key) is not None and p.get("quality") is not None]
        for i, run in enumerate(runs):
            mine = [p for p in pts if p["run"] == run]
            if mine:
                fig.add_scatter(x=[p[key] / scale for p in mine], y=[p["quality"] for p in mine], mode="markers",
                                name=run, legendgroup=run, showlegend=col == 1,
                                marker=dict(size=9, color=RUN_COLOURS[i % len(RUN_COLOURS)]),
                                text=[p["model"] for p in mine],
                                hovertemplate=html.escape(run) + " %{text}<br>%{x:.4g}<br>" + metric
                                              + " %{y:.4f}<extra></extra>", row=1, col=col)
        front = [pts[i] for i in pareto_front([p[key] for p in pts], [p["quality"] for p in pts], higher)]
        if front:
            fig.add_scatter(x=[p[key] / scale for p in front], y=[p["quality"] for p in front], mode="lines",
                            name="Pareto front", legendgroup="front", showlegend=col == 1,
                            line=dict(color=GREY, dash="dash"), hoverinfo="skip", row=1, col=col)
        if points and not pts and col == 2:
            # paper coordinates at the middle of the right panel (an "x2 domain" reference is read as data
            # coordinates of the left panel by the app's plotly.js, which stretched that panel's axes)
            fig.add_annotation(text="speed not measured:<br>turn on “Measure latency”",
                               x=sum(fig.layout.xaxis2.domain) / 2, y=0.5, xref="paper", yref="paper",
                               showarrow=False, font=dict(color=GREY))
    if not points:
        fig.add_annotation(text="finished runs appear here", x=0.5, y=0.5, xref="paper", yref="paper",
                           showarrow=False, font=dict(color=GREY))
    fig.update_xaxes(title_text="parameters (M)", row=1, col=1)
    fig.update_xaxes(title_text=speed_title, row=1, col=2)
    fig.update_yaxes(title_text=_quality_axis(metric), row=1, col=1)
    return _layout(fig, "Pareto: quality against size and speed", legend_below=True)


# --- export ------------------------------------------------------------------------------------

def charts_html(figures: Mapping[str, go.Figure], title: str = "Pruning Explorer charts") -> str:
    """One self-contained HTML page with every chart (plotly.js inlined once, works offline)."""
    parts = []
    for i, (name, fig) in enumerate(figures.items()):
        parts.append(f"<h2>{html.escape(name)}</h2>")
        parts.append(fig.to_html(full_html=False, include_plotlyjs=(i == 0)))
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head>"
            f"<body style='font-family:sans-serif'><h1>{html.escape(title)}</h1>{''.join(parts)}</body></html>")


def sensitivity_figure(result: Mapping) -> go.Figure:
    """Distiller-style sensitivity: quality against sparsity, one curve per layer pruned alone
    (the result of `explorer.sensitivity.sensitivity`)."""
    fig = _figure()
    metric = result.get("metric", "")
    for i, layer in enumerate(result.get("layers", [])):
        fig.add_scatter(x=list(layer["sparsity"]), y=list(layer["quality"]), mode="lines+markers",
                        name=f"layer {layer['index']}", line=dict(color=RUN_COLOURS[i % len(RUN_COLOURS)]),
                        hovertemplate=f"layer {layer['index']}<br>sparsity %{{x:.0%}}<br>{metric} %{{y:.4f}}<extra></extra>")
    fig.update_xaxes(title_text="sparsity of that layer alone", tickformat=".0%")
    fig.update_yaxes(title_text=_quality_axis(metric))
    return _layout(fig, "Sensitivity: one layer pruned at a time")


def prediction_front(points: Sequence[Mapping], current: Mapping | None, searched: Mapping | None,
                     dense: float, metric: str, cost_label: str) -> go.Figure:
    """Predicted val quality against predicted cost (speed-up or parameters kept) of uniform, the adaptive
    plans over an A sweep (a line), the plan on screen and the searched plan (explorer.predict.front)."""
    fig = _figure()
    sweep = [p for p in points if p["name"] != "uniform"]
    if sweep:
        fig.add_scatter(x=[p["cost"] for p in sweep], y=[p["quality"] for p in sweep], mode="lines+markers",
                        name="adaptive, A sweep", text=[p["name"] for p in sweep],
                        line=dict(color=BLUE), marker=dict(size=7),
                        hovertemplate="%{text}<br>%{x:.3f}<br>%{y:.4g}<extra></extra>")
    for name, pts, colour, symbol in (("uniform", [p for p in points if p["name"] == "uniform"], GREY, "square"),
                                      ("searched", [searched] if searched else [], GREEN, "star"),
                                      ("this plan", [current] if current else [], ORANGE, "diamond")):
        if pts:
            fig.add_scatter(x=[p["cost"] for p in pts], y=[p["quality"] for p in pts], mode="markers", name=name,
                            marker=dict(size=14 if name != "uniform" else 11, color=colour, symbol=symbol,
                                        line=dict(width=1, color="white")),
                            hovertemplate=name + "<br>%{x:.3f}<br>%{y:.4g}<extra></extra>")
    fig.add_hline(y=dense, line=dict(color=GREY, dash="dot"), annotation_text="dense",
                  annotation_position="bottom right")
    fig.update_xaxes(title_text=cost_label)
    fig.update_yaxes(title_text=f"predicted val {metric}" + (" (lower is better)" if metric == "perplexity" else ""))
    return _layout(fig, "Predicted quality of plans at this budget", legend_below=True)
