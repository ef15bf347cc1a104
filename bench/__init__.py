"""Benchmark suite of the Pruning Explorer (issue #6): `make bench` / `python -m bench`.

Sections (each can be run alone with `--only`):
  quality   accuracy / perplexity at equal parameters: dense, uniform, adaptive (ours),
            Torch-Pruning, one-shot, over budgets and seeds, same recovery budget
  speed     latency / throughput against dense and the same-width dense limit; params, FLOPs
  analysis  importance-analysis time against a plain forward + backward
  ui        server time of an allocation update and of a pruning stage
  methods   every method in explorer.methods.METHODS (issue #5's table)

Outputs: results.json, REPORT.md and plots.html in --out (default bench/).
"""
