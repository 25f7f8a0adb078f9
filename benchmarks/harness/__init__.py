"""The shared code of the benchmark scripts in `benchmarks/` (not installed with diffunet).

- `harness.models`: the cases, our model as the library runs it (`build_ours`: built, then
  `diffunet.accel.accelerate`) and the reference models of identical architecture.
- `harness.timing`: settings, input batches, the training step and forward pass, warm-up and
  timed repeats, counted FLOPs.
- `harness.layers`: one layer or call timed as CUDA-graph replays, variants compared, and the
  per-layer scripts' options and JSON output.
- `harness.profiling`: a step's kernel time grouped by class and its host time by op
  (`bench.py --profile`); `harness.host_sampler`: the Python stack sampled while steps run
  without the profiler.
- `harness.fill`: one cache-filling process (`bench.py --compile-ahead`, `ab.py`).
- `harness.resume`: which measurements of an unfinished run `bench.py --resume` keeps.

A script run as `python benchmarks/<name>.py` imports it from its own folder.
"""
