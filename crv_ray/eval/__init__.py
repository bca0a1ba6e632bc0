"""`crv-ray eval`: math benchmarks (packaged MATH-500, AIME 2024, AMC 2023, GSM8K, or a user file), generation with
vLLM on Ray Data through the engine layer of refine, scoring with `crv_ray.answers.check_answer`.

- config.py:     the `eval:` section of a run config (EvalConfig, BenchmarkSpec)
- benchmarks.py: the registry of packaged benchmarks and the loader (the column mapping of refine input)
- scoring.py:    pure metric functions (pass@1, maj@k, per-group tables)
- runner.py:     the Ray Data + vLLM glue, outputs, skip-on-rerun, console tables
"""

# crv_ray.config imports crv_ray.eval.config for RunConfig.eval, and eval.config needs classes defined in
# crv_ray.config: loading crv_ray.config first makes the import order the same whichever module is imported first.
import crv_ray.config  # noqa: F401
