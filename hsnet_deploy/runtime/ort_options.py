"""The one place ONNX Runtime SessionOptions are made: runner, ORT optimiser, INT8 check and export
verification agree on logging, optimisation level and threads."""

from __future__ import annotations

LEVELS = ("none", "basic", "extended", "all")


def session_options(level: str = "all", threads: int | None = None, optimized_path: str | None = None,
                    profile_prefix: str | None = None):
    """SessionOptions at graph optimisation `level` (one of LEVELS); `optimized_path` saves the optimised
    graph, `profile_prefix` turns on ONNX Runtime's profiler writing there."""
    import onnxruntime as ort

    if level not in LEVELS:
        raise ValueError(f"ONNX Runtime optimisation level {level!r}: one of {', '.join(LEVELS)}")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = {
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    if threads:
        opts.intra_op_num_threads = threads
    if optimized_path:
        opts.optimized_model_filepath = optimized_path
    if profile_prefix:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    return opts
