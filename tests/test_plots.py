"""Figure builders on synthetic data: the right traces, shapes and values (fast, no model)."""
import json

import numpy as np
import plotly.graph_objects as go
import pytest

from explorer import plots


def names(fig):
    return [t.name for t in fig.data]


def test_empty_shows_its_message():
    fig = plots.empty("Compute importance first")
    assert isinstance(fig, go.Figure) and not fig.data
    assert fig.layout.annotations[0].text == "Compute importance first"


def test_layer_importance_has_raw_sublayers_and_normalised():
    cos = np.array([0.1, 0.3, 0.2, 0.6])
    norm = (cos - cos.mean()) / np.abs(cos - cos.mean()).max()
    fig = plots.layer_importance(cos, norm, cos / 2, cos / 3)
    assert names(fig) == ["block I_L", "attention sublayer", "MLP sublayer", "Î_L"]
    assert list(fig.data[0].y) == pytest.approx(cos)
    assert list(fig.data[3].y) == pytest.approx(norm)
    assert fig.data[3].xaxis == "x2"  # normalised values in the right-hand panel
    assert max(abs(v) for v in fig.data[3].y) == pytest.approx(1.0)


def test_heads_heatmap_is_layers_by_heads_relative_to_layer_mean():
    heads = [np.array([1.0, 2.0, 3.0]), np.array([3.0, 3.0, 6.0])]
    fig = plots.heads_heatmap(heads, "taylor")
    z = np.asarray(fig.data[0].z, dtype=float)
    assert z.shape == (2, 3)
    assert z[0].tolist() == pytest.approx([0.5, 1.0, 1.5])
    assert z[1].tolist() == pytest.approx([0.75, 0.75, 1.5])
    assert np.asarray(fig.data[0].customdata, dtype=float)[1, :, 0].tolist() == pytest.approx([3, 3, 6])  # raw on hover
    assert "taylor" in fig.layout.title.text


def test_heads_heatmap_marks_kv_groups_and_fits_30_layers():
    rng = np.random.default_rng(0)
    heads = [rng.random(9) for _ in range(30)]
    heads[3][0] = 50.0  # one outlier head does not set the colour scale
    fig = plots.heads_heatmap(heads, "taylor", heads_per_group=3)
    groups = np.asarray(fig.data[0].customdata, dtype=float)[0, :, 1]
    assert groups.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2] and "KV group" in fig.data[0].hovertemplate
    assert sorted(shape.x0 for shape in fig.layout.shapes) == [2.5, 5.5]  # lines between the groups
    assert list(fig.layout.yaxis.range) == [29.5, -0.5] and fig.layout.yaxis.dtick == 2
    assert 1.5 <= fig.data[0].zmax < 4 and "3 per KV group" in fig.layout.xaxis.title.text


def test_heads_heatmap_pads_pruned_layers_with_gaps():
    fig = plots.heads_heatmap([np.ones(4), np.ones(2)])
    z = np.asarray(fig.data[0].z, dtype=float)
    assert z.shape == (2, 4) and np.isnan(z[1, 2:]).all() and not np.isnan(z[0]).any()


def test_bin_sorted_averages_consecutive_ranks():
    means, lo, hi = plots.bin_sorted(np.arange(8.0), 4)  # sorted descending: 7..0
    assert means.tolist() == [6.5, 4.5, 2.5, 0.5]
    assert lo.tolist() == [0, 2, 4, 6] and hi.tolist() == [1, 3, 5, 7]
    means, lo, hi = plots.bin_sorted([3.0, 1.0], 64)  # fewer values than bins: one per bin
    assert means.tolist() == [3.0, 1.0]


def test_neurons_heatmap_bins_thousands_of_neurons():
    rng = np.random.default_rng(0)
    neurons = [rng.random(1536) for _ in range(6)]
    fig = plots.neurons_heatmap(neurons, "fisher", bins=64)
    z = np.asarray(fig.data[0].z, dtype=float)
    assert z.shape == (6, 64)
    assert (np.diff(z, axis=1) <= 1e-12).all()  # sorted descending within each layer
    assert z.mean(axis=1) == pytest.approx(np.ones(6))  # 1536 = 64 x 24: equal bins, mean 1
    assert "1536" in fig.layout.xaxis.title.text


def test_allocation_chart_adaptive_beside_uniform_with_flags():
    fig = plots.allocation_chart([0.2, 0.3, 0.5], [0.33] * 3, 0.33, clipped=[False, False, True],
                                 manual=[True, False, False], normalized=[1.0, 0.0, -1.0], title="t")
    assert names(fig) == ["adaptive S_L", "uniform S_base", "clipped", "set by hand", "adaptive − uniform", "Î_L"]
    assert list(fig.data[0].y) == pytest.approx([0.2, 0.3, 0.5])
    assert list(fig.data[2].x) == [2] and list(fig.data[3].x) == [0]
    assert list(fig.data[4].y) == pytest.approx([-0.13, -0.03, 0.17]) and fig.data[4].yaxis == "y3"  # the difference
    assert fig.data[5].yaxis == "y2"
    assert fig.layout.shapes[0].y0 == pytest.approx(0.33)  # the S_base line
    json.loads(fig.to_json())  # serialisable for the browser


def test_allocation_chart_without_flags_has_two_bar_traces():
    fig = plots.allocation_chart([0.3] * 4, [0.3] * 4, 0.3)
    assert names(fig) == ["adaptive S_L", "uniform S_base"]  # no difference: no difference panel


def test_quality_chart_dense_point_and_one_point_per_stage():
    fig = plots.quality_chart(0.85, [0.15, 0.3], [0.83, 0.8], "accuracy")
    assert names(fig) == ["dense", "stages"]
    assert list(fig.data[1].x) == pytest.approx([0.0, 0.15, 0.3])
    assert list(fig.data[1].text) == ["", "stage 1", "stage 2"]
    only_dense = plots.quality_chart(0.85, [], [], "accuracy")
    assert names(only_dense) == ["dense"]


def test_loss_chart_counts_steps_across_stages():
    fig = plots.loss_chart({1: [1.0, 0.9], 2: [0.8, 0.7, 0.6]})
    assert names(fig) == ["stage 1", "stage 2"]
    assert list(fig.data[1].x) == [3, 4, 5]
    assert plots.loss_chart({}).layout.annotations  # says why it is empty


def test_stage_cost_chart_params_and_latency():
    fig = plots.stage_cost_chart(["dense", "stage 1"], [22e6, 18e6], [100.0, 80.0])
    assert names(fig) == ["parameters (M)", "latency (ms)"]
    assert list(fig.data[0].y) == pytest.approx([22.0, 18.0])
    no_latency = plots.stage_cost_chart(["dense"], [22e6], [None])
    assert names(no_latency) == ["parameters (M)"]


def test_history_chart_one_line_per_run():
    runs = [{"label": "uniform", "removed": [0, 0.3], "quality": [0.85, 0.7]},
            {"label": "adaptive A=0.05", "removed": [0, 0.15, 0.3], "quality": [0.85, 0.82, 0.78]}]
    fig = plots.history_chart(runs, "accuracy")
    assert names(fig) == ["uniform", "adaptive A=0.05"]
    assert len(fig.data[1].x) == 3


def test_pareto_front_accuracy_and_perplexity():
    cost = [10, 8, 6, 6, 4]
    acc = [0.90, 0.85, 0.70, 0.80, 0.60]
    assert plots.pareto_front(cost, acc) == [4, 3, 1, 0]  # cheapest first; (6, 0.70) is dominated
    ppl = [20, 25, 40, 30, 50]
    assert plots.pareto_front(cost, ppl, higher_is_better=False) == [4, 3, 1, 0]
    assert plots.pareto_front([1, 2], [0.9, 0.8]) == [0]


def test_pareto_chart_points_per_run_and_front_in_both_panels():
    pts = [{"run": "a", "model": "dense", "params": 22e6, "latency_ms": 100.0, "quality": 0.85},
           {"run": "a", "model": "stage 1", "params": 18e6, "latency_ms": 80.0, "quality": 0.83},
           {"run": "b", "model": "stage 1", "params": 18e6, "latency_ms": None, "quality": 0.80}]
    fig = plots.pareto_chart(pts, "accuracy")
    left = [t for t in fig.data if t.xaxis == "x"]
    right = [t for t in fig.data if t.xaxis == "x2"]
    assert [t.name for t in left] == ["a", "b", "Pareto front"]
    assert [t.name for t in right] == ["a", "Pareto front"]  # b has no latency
    assert list(left[0].x) == pytest.approx([22.0, 18.0])


def test_charts_html_is_one_offline_page():
    page = plots.charts_html({"one": plots.empty("x"), "two": plots.quality_chart(0.8, [0.1], [0.7], "accuracy")})
    assert page.count("<h2>") == 2 and "<h2>two</h2>" in page
    assert page.count("Plotly.newPlot") == 2
    assert 'src="https://cdn' not in page and len(page) > 1_000_000  # plotly.js inlined once: works offline


def test_sensitivity_figure_one_curve_per_layer():
    from explorer.plots import sensitivity_figure
    res = {"metric": "accuracy", "layers": [{"index": i, "sparsity": [0, 0.5, 0.9], "quality": [0.8, 0.7 - i / 10, 0.5]}
                                            for i in range(3)]}
    fig = sensitivity_figure(res)
    assert len(fig.data) == 3 and list(fig.data[1].y) == [0.8, 0.6, 0.5]
