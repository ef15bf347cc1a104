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
    assert names(fig) == ["adaptive S_L", "uniform S_base", "clipped", "set by hand", plots.DIFF_MORE,
                          plots.DIFF_LESS, "Î_L"]
    assert list(fig.data[0].y) == pytest.approx([0.2, 0.3, 0.5])
    assert list(fig.data[2].x) == [2] and list(fig.data[3].x) == [0]
    more, less = fig.data[4], fig.data[5]  # the difference, one series per sign, on its own axis
    assert list(more.y) == [None, None, pytest.approx(0.17)] and more.yaxis == less.yaxis == "y3"
    assert list(less.y) == [pytest.approx(-0.13), pytest.approx(-0.03), None]
    assert fig.data[6].yaxis == "y2"
    assert fig.layout.shapes[0].y0 == pytest.approx(0.33)  # the S_base line
    json.loads(fig.to_json())  # serialisable for the browser


def test_allocation_chart_difference_keeps_its_colours_whatever_the_plan():
    """The legend swatch of each difference series is the same on every model: one fixed colour per
    series, never a per-bar list (whose first bar, red or green by the plan, colours the swatch)."""
    def colours(adaptive):
        fig = plots.allocation_chart(adaptive, [0.3] * 3, 0.3)
        return {t.name: t.marker.color for t in fig.data if t.name in (plots.DIFF_MORE, plots.DIFF_LESS)}
    first_up, first_down = colours([0.5, 0.2, 0.2]), colours([0.1, 0.4, 0.4])
    assert first_up == first_down == {plots.DIFF_MORE: plots.RED, plots.DIFF_LESS: plots.GREEN}


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


def test_quality_chart_error_bars_budget_and_a_range_that_does_not_magnify_noise():
    """Points 0.826-0.830 whose 95 % intervals are ±0.03 wide: the axis holds the dense figure and every
    interval and spans at least twice the widest interval (not 0.826-0.830, where noise looks like signal)."""
    ivs = [[0.80, 0.86], [0.797, 0.857], [0.796, 0.856]]
    fig = plots.quality_chart(0.83, [0.15, 0.3], [0.827, 0.826], "accuracy", title="accuracy (val) vs removed",
                              subtitle="200 val examples a point; " + "#1 exact A=0.05, S=0.3, K=2, " * 4,
                              intervals=ivs, notes=["not timed"] * 3)
    lo, hi = fig.layout.yaxis.range
    assert lo <= 0.796 and hi >= 0.86 and hi - lo >= 2 * 0.06
    dense, stages = fig.data[0], fig.data[1]
    assert list(dense.error_y.array) == pytest.approx([0.03]) and list(dense.error_y.arrayminus) == pytest.approx([0.03])
    assert stages.error_y.array[0] is None  # the dense point's bar is drawn once, on its own trace
    assert list(stages.error_y.array[1:]) == pytest.approx([0.03, 0.03])
    assert list(stages.error_y.arrayminus[1:]) == pytest.approx([0.03, 0.03])
    assert "not timed" in stages.customdata[1] and "95 % interval 0.797–0.857" in stages.customdata[1]
    title = fig.layout.title.text.split("<br>")
    assert title[0] == "accuracy (val) vs removed"
    assert len(title) >= 3  # the long run label wraps onto lines of its own
    assert all(len(line.split(">", 1)[-1].replace("</span>", "")) <= plots.SUBTITLE_CHARS for line in title[1:])
    assert fig.layout.margin.t >= 60 + 15 * (len(title) - 1)  # room for every line


def test_quality_range_keeps_a_minimum_span_and_accuracy_inside_0_1():
    assert plots.quality_range([0.828, 0.829], None, "accuracy")[1] - plots.quality_range(
        [0.828, 0.829], None, "accuracy")[0] >= 0.04
    lo, hi = plots.quality_range([0.99, 0.995], [[0.97, 1.0], [0.98, 1.0]], "accuracy")
    assert hi <= 1.0 and lo < 0.97 and hi - lo >= 0.06
    lo, hi = plots.quality_range([47.1, 47.3], [[45.9, 48.4]], "perplexity")
    assert lo <= 45.9 and hi >= 48.4 and hi - lo >= 2 * 2.5
    assert plots.quality_range([None], None) is None


def test_reconstruction_chart_says_what_the_refit_did_per_layer():
    recs = {1: {"error_ratio": 0.25, "tokens": 1234, "seconds": 0.5, "layer_errors": [[4.0, 1.0], [2.0, 1.0]]},
            2: {"error_ratio": 0.4, "tokens": 1234, "seconds": 0.6, "layer_errors": [[1.0, 0.4], [0.0, 0.0]]}}
    fig = plots.reconstruction_chart(recs)
    assert names(fig) == ["stage 1", "stage 2"]
    assert list(fig.data[0].y) == pytest.approx([0.25, 0.5]) and list(fig.data[1].x) == [0]  # nothing cut: no bar
    text = fig.layout.title.text
    assert text.startswith("Reconstruction: closed-form refit, no training steps")
    assert "stage 1: 25% of the plain cut's error left, 1,234 calibration tokens" in text
    assert not fig.layout.annotations  # not "no recovery steps"
    old = plots.reconstruction_chart({1: {"error_ratio": 0.3, "tokens": 10, "seconds": 0.1}})  # no per-layer errors
    assert list(old.data[0].y) == pytest.approx([0.3])


def test_loss_chart_counts_steps_across_stages():
    fig = plots.loss_chart({1: [1.0, 0.9], 2: [0.8, 0.7, 0.6]})
    assert names(fig) == ["stage 1", "stage 2"]
    assert list(fig.data[1].x) == [3, 4, 5]
    assert plots.loss_chart({}).layout.annotations  # says why it is empty


def test_stage_cost_chart_params_and_latency():
    fig = plots.stage_cost_chart(["dense", "stage 1"], [22e6, 18e6], [100.0, 80.0])
    assert names(fig) == ["parameters (M)", "latency (ms)"]
    assert list(fig.data[0].y) == pytest.approx([22.0, 18.0])
    no_latency = plots.stage_cost_chart(["dense"], [22e6], [None], not_timed="latency not timed: tick it")
    assert names(no_latency) == ["parameters (M)"]
    assert no_latency.layout.annotations[0].text == "latency not timed: tick it"  # says so, not an empty axis
    long = plots.stage_cost_chart(["dense"], [22e6], [None], not_timed="latency not timed: " + "word " * 30)
    lines = long.layout.annotations[0].text.split("<br>")
    assert len(lines) > 1 and max(map(len, lines)) <= plots.SUBTITLE_CHARS  # wrapped to the chart's width
    assert "not timed" in no_latency.layout.title.text and not fig.layout.annotations


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


def test_pareto_chart_without_speed_says_so_in_the_right_panel_without_stretching_the_left():
    pts = [{"run": "a", "model": "dense", "params": 22e6, "latency_ms": None, "quality": 0.83},
           {"run": "a", "model": "stage 1", "params": 18e6, "latency_ms": None, "quality": 0.80}]
    fig = plots.pareto_chart(pts, "accuracy")
    note = next(a for a in fig.layout.annotations if "speed not measured" in a.text)
    # paper coordinates inside the right panel: data coordinates would put it at (0.5, 0.5) of the left
    # panel and stretch its axes to 0 M parameters and accuracy 0.5
    assert (note.xref, note.yref) == ("paper", "paper")
    lo, hi = fig.layout.xaxis2.domain
    assert lo < note.x < hi


@pytest.mark.parametrize("fig", [plots.quality_chart(0.85, [0.2], [0.8], "accuracy"),
                                 plots.allocation_chart([0.2, 0.4], [0.3, 0.3], 0.3)], ids=["_layout", "allocation"])
def test_titles_start_below_the_apps_label_chip(fig):
    """gr.Plot draws its label over the chart's top-left corner: every title is pushed below it."""
    t = fig.layout.title
    assert t.yref == "container" and t.yanchor == "top" and t.pad.t >= 24
    assert fig.layout.margin.t >= 60 + t.pad.t


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
