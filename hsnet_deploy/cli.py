"""hsnet-deploy's command line: parse, call the library, print. No logic of its own."""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

import click

from hsnet_deploy.defaults import default_artifact, quiet_exporters
from hsnet_deploy.errors import GateFailure, UserError
from hsnet_deploy.termination import (
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
    SignalState,
    raise_if_stopped,
    sigterm_as_interrupt,
)

BACKBONE_CHOICE = click.Choice(["vgg16", "resnet50", "resnet101"])


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    from hsnet_deploy.info import version_line

    click.echo(version_line())
    ctx.exit(0)


def max_pixels_option(func):
    """--max-megapixels: the decode limit for every image and mask the command reads."""
    from hsnet_deploy.data.limits import DEFAULT_MAX_MEGAPIXELS

    def apply(_ctx, _param, value):
        from hsnet_deploy.data.preprocess import set_max_pixels

        if value is not None and value <= 0:
            raise UserError(f"--max-megapixels {value}: must be above 0")
        set_max_pixels(int(value * 1e6))
        return value

    return click.option("--max-megapixels", type=float, default=DEFAULT_MAX_MEGAPIXELS, show_default=True,
                        expose_value=False, callback=apply,
                        help="Largest image or mask decoded; a larger JPEG is decoded at 1/2..1/8 scale, "
                             "any other file refused.")(func)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 80})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="Show the version with those of torch, ONNX Runtime and TensorRT, and exit.")
def cli() -> None:
    """HSNet few-shot segmentation, deployed: export a PyTorch HSNet to ONNX (verified against PyTorch),
    build FP32/FP16/INT8 engines for ONNX Runtime or TensorRT, and benchmark, evaluate and run them.

    \b
    Typical flow:
      hsnet-deploy export --backbone resnet50 --checkpoint best.pt -o m.onnx
      hsnet-deploy build-engine m.onnx --backend onnxruntime -o m.ort.onnx
      hsnet-deploy bench m.onnx m.ort.onnx
      hsnet-deploy predict m.onnx --query q.jpg --support s.jpg s.png -o q.png
      hsnet-deploy info m.onnx
    """


def load_model(backbone: str | None, checkpoint: str | None, seed: int):
    """The model and a description of its weights for metadata: a checkpoint's sha256, or the seed."""
    from hsnet_deploy.artifacts import sha256_file
    from hsnet_deploy.console import err
    from hsnet_deploy.model import load_checkpoint, seeded_model

    if checkpoint:
        model = load_checkpoint(checkpoint, backbone)
        return model, {"weights": "checkpoint", "checkpoint": Path(checkpoint).name,
                       "checkpoint_format": model.source_format, "checkpoint_sha256": sha256_file(checkpoint)}
    if backbone is None:
        raise UserError("--backbone is required when no --checkpoint is given")
    err.print(f"[yellow]No --checkpoint: using SEEDED RANDOM weights (seed {seed}); the outputs are meaningless "
              "for segmentation, fine for checking export and speed.[/]")
    return seeded_model(backbone, seed), {"weights": "seeded-random", "seed": seed}


def _options_given() -> set[str]:
    """The options of the running command that the user typed (not defaults), by their long spelling."""
    ctx = click.get_current_context()
    return {max(p.opts, key=len) for p in ctx.command.params if isinstance(p, click.Option)
            and ctx.get_parameter_source(p.name) == click.core.ParameterSource.COMMANDLINE}


def write_json(path: str | None, obj: object, what: str = "") -> None:
    """Write --json atomically and say where it went (on stderr, so stdout stays the table)."""
    if path:
        from hsnet_deploy.artifacts import write_json_atomic
        from hsnet_deploy.console import err

        write_json_atomic(path, obj)
        if what:
            err.print(f"Wrote the {what} as JSON to {path}")


@cli.command()
@click.option("--backbone", type=BACKBONE_CHOICE, help="Backbone; recorded in our own checkpoints, required otherwise.")
@click.option("--checkpoint", type=click.Path(dir_okay=False), help="The authors' best_model.pt or our own format.")
@click.option("--img-size", default=400, show_default=True, help="H = W fixed in the graph (B and K stay dynamic).")
@click.option("--opset", default=None, type=int, help="ONNX opset (default 20, at least 18).")
@click.option("--seed", default=0, show_default=True, help="Seed for random weights when no --checkpoint is given.")
@click.option("-o", "--output", required=True, type=click.Path(), help="The .onnx file to write (atomically).")
@click.option("--simplify/--no-simplify", default=True, show_default=True,
              help="Fold BatchNorm and cancel transposes with onnxslim (before verification).")
@click.option("--layout", default="all", show_default=True, metavar="all|none|SWITCH,...",
              help="Copy-saving layouts to use: all, none, or a comma list of dilated_query_conv, halo, "
                   "support_major_mixing, single_bias. Each computes the same sums; which is fastest depends "
                   "on the runtime.")
@click.option("--json", "json_path", type=click.Path(), help="Also write the export report as JSON.")
def export(backbone, checkpoint, img_size, opset, seed, output, simplify, layout, json_path):
    """Export HSNet to ONNX, every center-pivot 4D conv as reshaped 2D convs, and verify it.

    The written model is checked against eager PyTorch in ONNX Runtime on random episodes (B = 1, 2;
    K = 1, 2, 3; filled and pixel-noise masks), on the logits AND the three hypercorrelation tensors.
    Above tolerance (max |diff| > 1e-4 of max |reference|) nothing is written and the exit status is 1.
    """
    import time

    from hsnet_deploy.artifacts import check_output_path
    from hsnet_deploy.console import err, out, table
    from hsnet_deploy.export import DEFAULT_OPSET, check_opset, export_onnx
    from hsnet_deploy.info import run_record
    from hsnet_deploy.model import ExportLayout, check_image_size
    from hsnet_deploy.preflight import export as check_export

    if checkpoint and "--seed" in _options_given():
        raise UserError("--seed gives random weights when no --checkpoint is given; with --checkpoint it would be "
                        "ignored")

    quiet_exporters()
    check_output_path(output)
    check_export(output, json_path, checkpoint, img_size)
    try:
        export_layout = ExportLayout.parse(layout)
    except ValueError as exc:
        raise UserError(f"--layout {layout!r}: {exc}") from None
    if backbone:
        try:
            check_image_size(backbone, img_size, img_size)
        except UserError as exc:
            raise UserError(f"--img-size {img_size}: {exc}") from None
    opset = DEFAULT_OPSET if opset is None else opset
    check_opset(opset)
    model, source = load_model(backbone, checkpoint, seed)
    started = time.perf_counter()
    steps = iter(range(1, 10))

    def step(message: str) -> None:
        raise_if_stopped()  # a stop torch's tracer swallowed ends the export here, not after minutes more
        err.print(f"[bold]\\[{next(steps)}/4][/] {message}  [dim]({time.perf_counter() - started:.0f}s)[/]")

    report = export_onnx(model, output, img_size, opset, source,
                         simplify=simplify, step=step, layout=export_layout)
    rows = []
    for c in report.checks:
        for e in c.errors:
            rows.append((f"B={c.batch} K={c.shots} {c.masks}", e.name, e.max_abs, e.mean_abs, e.rel, c.mask_agreement))
    out.print(table("Verification: ONNX Runtime (CPU) vs eager PyTorch",
                    ["episode", "tensor", "max |diff|", "mean |diff|", "max / max|ref|", "mask agreement"], rows))
    settings = {"backbone": backbone, "checkpoint": checkpoint, "img_size": img_size, "opset": opset, "seed": seed,
                "simplify": simplify, "layout": layout, "output": output}
    write_json(json_path, {**report.to_dict(), "weights": source, **run_record(settings)}, "export report")
    if not report.passed:
        raise GateFailure(
            f"verification failed: worst relative error {max(c.worst_rel() for c in report.checks):.2e} "
            f"> {report.tolerance:.0e}; {output} was not written"
        )
    out.print(f"[green]Wrote {output}[/]: {report.file_bytes / 2**20:.1f} MiB, {report.nodes} nodes "
              f"({report.op_counts.get('Conv', 0)} Conv, all 2D"
              f"{f'; {report.nodes_traced} before onnxslim' if simplify else ''}), opset {report.opset}, "
              f"worst relative error {max(c.worst_rel() for c in report.checks):.1e}, {report.seconds:.0f}s")



@cli.command("build-engine")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt"]), default="onnxruntime", show_default=True,
              help="Runtime the output is for.")
@click.option("--fp16", is_flag=True, help="Mixed-precision FP16 variant behind the accuracy gate.")
@click.option("--int8", is_flag=True, help="INT8 Q/DQ variant calibrated on --calib-data, gated.")
@click.option("--calib-data", type=click.Path(file_okay=False),
              help="Episodes: --int8 calibrates and gates on them, --fp16 gates on them.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="onnxruntime: the execution provider the model is optimised for.")
@click.option("--max-batch", default=8, show_default=True, help="tensorrt: largest B in the optimisation profile.")
@click.option("--max-shots", default=5, show_default=True, help="tensorrt: largest K in the optimisation profile.")
@click.option("--opt-batch", default=1, show_default=True, help="tensorrt: B the kernels are tuned for.")
@click.option("--opt-shots", default=1, show_default=True, help="tensorrt: K the kernels are tuned for.")
@click.option("--workspace", default=4.0, show_default=True, help="tensorrt: builder workspace limit in GiB.")
@click.option("--timing-cache", type=click.Path(dir_okay=False), default=None,
              help="tensorrt: timing cache reused across builds [default: <cache dir>/trt-timing.cache].")
@click.option("--version-compatible", is_flag=True,
              help="tensorrt: a plan that later TensorRT versions and the 44 MB lean runtime can run.")
@click.option("--tf32", is_flag=True, help="tensorrt: allow TF32 (off by default for FP32 parity).")
@click.option("--calib-episodes", default=32, show_default=True, type=click.IntRange(1),
              help="INT8: episodes to calibrate on (seeded draw).")
@click.option("--gate-episodes", default=16, show_default=True, type=click.IntRange(1),
              help="Held-out episodes for the accuracy gate (none shared with calibration).")
@click.option("--fold", default=0, show_default=True, help="Fold, when --calib-data is a PASCAL/COCO layout.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, 2**32 - 1),
              help="Seed of the calibration / gate draw.")
@click.option("--quantize", "quantize", default=None,
              help="INT8: stages to quantise, comma-separated from backbone,correlation,learner,decoder "
                   "[default per backend: measured, see README].")
@click.option("--calib-method", type=click.Choice(["minmax", "entropy", "percentile"]), default="minmax",
              show_default=True, help="INT8: how activation ranges are taken from the calibration episodes.")
@click.option("--gate-max-miou-drop", type=click.FloatRange(0, 100),
              help="Gate: largest mIoU drop in points, over episodes with a query mask [1.0].")
@click.option("--gate-min-agreement", type=click.FloatRange(0, 1),
              help="Gate: smallest mean IoU of variant vs FP32 masks [0.95].")
@click.option("--gate-min-worst-agreement", type=click.FloatRange(0, 1), help="Gate: smallest per-episode IoU vs FP32 [off].")
@click.option("--gate-min-sign-agreement", type=click.FloatRange(0, 1),
              help="Gate: smallest margin-weighted fg-bg sign agreement [0.999].")
@click.option("--gate-max-logit-error", type=click.FloatRange(0), help="Gate: largest relative logit error [off].")
@click.option("--fp16-keep", default="mask,l2norm,groupnorm,vote", show_default=True,
              help="FP16: groups kept in FP32 (mask = support-mask path, required; the rest are precautions).")
@click.option("--variant-onnx", type=click.Path(dir_okay=False),
              help="tensorrt + --fp16/--int8: where to keep the variant ONNX [default: OUTPUT.onnx].")
@click.option("-o", "--output", required=True, type=click.Path(), help="Engine or optimised model to write.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the gate report as JSON too.")
@max_pixels_option
def build_engine(model, backend, fp16, int8, calib_data, device, max_batch, max_shots, opt_batch, opt_shots,
                 workspace, timing_cache, version_compatible, tf32, calib_episodes, gate_episodes, fold, seed,
                 quantize, calib_method, gate_max_miou_drop, gate_min_agreement, gate_min_worst_agreement,
                 gate_min_sign_agreement, gate_max_logit_error, fp16_keep, variant_onnx, output, json_path):
    """Compile an exported ONNX model for a backend.

    \b
    onnxruntime: ONNX Runtime's graph optimisations applied once and saved
                 (with the metadata), tied to this ONNX Runtime and device.
    tensorrt:    a strongly typed TensorRT plan (10.x / 11.x), one profile
                 over B and K; the plan is unmodified (trtexec loads it),
                 the metadata sits in OUTPUT.json.

    \b
    --fp16: mixed-precision ONNX (ModelOpt AutoCast) keeping in FP32 what
            must stay (support-mask path, L2 norm, GroupNorm, the vote).
    --int8: explicit Q/DQ calibrated on --calib-data; the scheme follows
            the backend (uint8 activations for ONNX Runtime's CPU kernels,
            symmetric int8, zero-point 0, for TensorRT).

    Both are compared with FP32 on held-out episodes; a variant that fails the gate is not written
    (exit 1); --json keeps the gate report. With --backend tensorrt the variant ONNX is kept beside
    the plan and built strongly typed. Refused before any work: an output that is an input,
    --fp16 with --int8, --calib-data without either, an ONNX Runtime-optimised MODEL, --fp16/--int8 on
    an FP16/INT8 MODEL (a gated variant given as MODEL is built as it is).
    """
    from hsnet_deploy import preflight
    from hsnet_deploy.build import BuildRequest, build
    from hsnet_deploy.console import err, out

    precision = preflight.precision_flags(fp16, int8)
    preflight.build_options(backend, precision, _options_given())
    preflight.variant_options(precision, calib_data, _options_given(), fp16_keep)
    preflight.build_engine(model, output, precision, backend, calib_data, variant_onnx, json_path, timing_cache)
    thresholds = {k: v for k, v in {
        "max_miou_drop": gate_max_miou_drop, "min_mean_agreement": gate_min_agreement,
        "min_worst_agreement": gate_min_worst_agreement, "min_sign_agreement": gate_min_sign_agreement,
        "max_logit_error": gate_max_logit_error}.items() if v is not None}
    request = BuildRequest(
        model, output, backend=backend, precision=precision, device=device, calib_data=calib_data,
        calib_episodes=calib_episodes, gate_episodes=gate_episodes, fold=fold, seed=seed,
        quantize=[x.strip() for x in quantize.split(",") if x.strip()] if quantize is not None else None,
        calib_method=calib_method, thresholds=thresholds,
        fp16_keep=tuple(x.strip() for x in fp16_keep.split(",") if x.strip()), variant_onnx=variant_onnx,
        max_batch=max_batch, max_shots=max_shots, opt_batch=opt_batch, opt_shots=opt_shots, workspace_gib=workspace,
        timing_cache=timing_cache, version_compatible=version_compatible, tf32=tf32)
    try:
        result = build(request, step=err.print)
    except GateFailure as failure:
        _print_gate(getattr(failure, "report", None), json_path)
        raise
    _print_gate(result.gate, None)
    out.print(f"[green]Wrote {', '.join(result.written)}[/]: {result.summary}")
    write_json(json_path, result.report, "gate report" if result.gate is not None else "build report")


def _print_gate(report, json_path: str | None = None) -> None:
    """The accuracy gate: one row per threshold with its verdict (the per-episode figures go to --json)."""
    from hsnet_deploy.console import err, out, table, versus

    if report is None:
        return
    data = report.to_dict()
    rows = [(c["name"], versus(c["value"], c["limit"]), f"{c['op']} {c['limit']}", c["status"]) for c in data["checks"]]
    # the title as a line of its own: a table title wraps at the (narrow) table's width
    out.print(f"accuracy gate: {data['precision']} vs FP32, {len(data['episodes'])} held-out episodes")
    out.print(table("", ["check", "value", "needs", "verdict"], rows))
    for note in data.get("notes", []):
        err.print(f"[dim]note: {note}[/]")
    write_json(json_path, data, "gate report")


@cli.command()
@click.argument("artifacts", nargs=-1, type=click.Path(dir_okay=False))
@click.option("--batch", "-b", default=1, show_default=True, help="Episodes per call (B).")
@click.option("--shots", "-k", default=1, show_default=True, help="Support images per episode (K).")
@click.option("--iters", "-n", default=20, show_default=True, help="Timed calls per runner.")
@click.option("--warmup", default=3, show_default=True, help="Untimed calls first (the first one is the cold call).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where to run (auto: CUDA where a backend can use it, else CPU).")
@click.option("--threads", type=click.IntRange(1), default=None,
              help="CPU threads for every runner [default: all cores].")
@click.option("--backbone", type=BACKBONE_CHOICE, help="For an authors' checkpoint given as ARTIFACT.")
@click.option("--img-size", default=400, show_default=True, help="Image size of the embedded default model.")
@click.option("--stages/--no-stages", default=True, show_default=True, help="Per-stage time breakdown.")
@click.option("--cuda-graph", is_flag=True,
              help="ONNX Runtime CUDA: I/O bound to fixed device buffers, one CUDA graph captured per (B, K).")
@click.option("--cuda-ep-option", "ep_option", multiple=True, metavar="KEY=VALUE",
              help="ONNX Runtime CUDA EP option, repeatable: prefer_nhwc=0|1, cudnn_conv_algo_search="
                   "EXHAUSTIVE|HEURISTIC|DEFAULT, use_tf32=0|1, cudnn_conv_use_max_workspace=0|1. "
                   "Defaults: HEURISTIC, use_tf32=1 (measured fastest; use_tf32=0 for strict FP32).")
@click.option("--json", "json_path", type=click.Path(), help="Write every figure as JSON too.")
@click.option("--report", "report_path", type=click.Path(file_okay=False),
              help="Write an HTML report with plots to this folder (needs the plot extra).")
def bench(artifacts, batch, shots, iters, warmup, device, threads, backbone, img_size, stages, cuda_graph, ep_option,
          json_path, report_path):
    """Latency, throughput, memory and per-stage time of each runner, against PyTorch eager in the same run.

    With no ARTIFACT: the embedded default (resnet50, SEEDED RANDOM weights, exported on the fly into
    the cache directory), PyTorch eager against every backend available on this machine. Ctrl-C stops
    and prints what was measured so far. On a GPU it also runs torch.compile (reduce-overhead, FP16
    autocast) as the anchor, and times ONNX Runtime CUDA with host I/O and with inputs already on the GPU.
    """
    from hsnet_deploy.console import err, out, progress_bar, table
    from hsnet_deploy.info import run_record
    from hsnet_deploy.preflight import bench as check_bench
    from hsnet_deploy.runtime.bench import short_labels
    from hsnet_deploy.runtime.ort_cuda import parse_ep_options
    from hsnet_deploy.runtime.suite import run_suite

    ep_options = parse_ep_options(ep_option)
    if device == "cpu" and (cuda_graph or ep_options):  # refused before the default model is exported
        raise UserError(f"{'--cuda-graph' if cuda_graph else '--cuda-ep-option'}: for ONNX Runtime on CUDA, "
                        "not --device cpu")
    if report_path:
        from hsnet_deploy.report import require_plotting

        require_plotting(report_path, [("--json", json_path)])
    if batch < 1 or shots < 1 or iters < 1 or warmup < 0:
        raise UserError("--batch, --shots and --iters must be at least 1, --warmup at least 0")
    check_bench(list(artifacts), device, cuda_graph, json_path, _options_given())
    paths = [Path(a) for a in artifacts] or [default_artifact(img_size)]
    with progress_bar() as bar:
        def on_start(runner, n):
            task = bar.add_task(runner.info.label, total=n, status="")
            return lambda: bar.advance(task)

        suite = run_suite(paths, batch=batch, shots=shots, iters=iters, warmup=warmup, device=device,
                          threads=threads, backbone=backbone, stages=stages, cuda_graph=cuda_graph,
                          default=not artifacts, ep_options=ep_options, on_start=on_start)
    labels, artifact_notes = short_labels(suite.results)
    rows = []
    for label, r in zip(labels, suite.results):
        lat = r.latency_ms or {}
        mem = r.device_mem_mb if r.device_mem_mb is not None else r.peak_rss_mb
        rows.append((label, lat.get("mean"), lat.get("p50"), r.cold_ms, r.episodes_per_s, mem,
                     r.gflop_per_s, f"{r.speedup_vs_eager:.2f}x" if r.speedup_vs_eager else None))
    title = (f"bench: B={suite.batch} K={suite.shots} {suite.img_size}x{suite.img_size} {suite.backbone}, "
             "latency in ms")
    out.print(table(title, ["runner", "mean", "p50", "cold", "ep/s", "peak MB", "GFLOP/s",
                            "vs eager"], rows))
    for line in artifact_notes:
        out.print(line, soft_wrap=True)
    out.print(f"machine: {suite.machine.get('cpu', '')}; percentiles (p90, p95, p99, min, max) with --json",
              soft_wrap=True)
    stage_names = ["backbone", "correlation", "learner", "decoder", "other"]
    stage_rows = [(label, *[r.stages_ms.get(s) for s in stage_names])
                  for label, r in zip(labels, suite.results) if r.stages_ms]
    if stage_rows:
        out.print(table("per-stage time, ms per call (each backend's profiler)",
                        ["runner", "backbone", "corr.", "learner", "decoder", "other"], stage_rows))
    io_rows = [(label, r.latency_ms.get("p50"), r.device_io_ms.get("p50"), r.latency_ms.get("mean"),
                r.device_io_ms.get("mean")) for label, r in zip(labels, suite.results)
               if r.device_io_ms and r.latency_ms]
    if io_rows:
        out.print(table("host vs device I/O (inputs already on the GPU), ms per call",
                        ["runner", "host p50", "dev. p50", "host mean", "dev. mean"], io_rows))
    for r in suite.results:
        if r.compile_s is not None:
            out.print(f"{r.label}: compile time {r.compile_s:.1f} s (first call of B={suite.batch} K={suite.shots})")
    if suite.episode_gflop:
        out.print(f"Episode cost {suite.episode_gflop:.1f} GFLOP (PyTorch FlopCounter); this machine's FP32 "
                  f"matmul ran at {suite.matmul_gflop_per_s:.0f} GFLOP/s in the same run.")
    for line in suite.notes + suite.skipped:
        err.print(f"[dim]note: {line}[/]")
    settings = {"batch": batch, "shots": shots, "iters": iters, "warmup": warmup, "device": device,
                "threads": threads, "img_size": suite.img_size, "stages": stages, "cuda_graph": cuda_graph,
                "cuda_ep_options": list(ep_option), "artifacts": [str(p) for p in paths]}
    # `--device auto` is recorded as given in the settings; where the runners actually ran is recorded here.
    record = {**suite.to_dict(), "devices": sorted({r.device for r in suite.results}), **run_record(settings)}
    for result, label in zip(record["results"], labels, strict=True):
        result["table_label"] = label  # the row's name in the table above (`label` is the runner's full name)
    write_json(json_path, record, "benchmark")
    if report_path:
        from hsnet_deploy.report import write_bench_report

        err.print(f"Report: {write_bench_report(record, report_path) / 'index.html'}")
    if suite.interrupted:
        err.print("[yellow]Interrupted: the figures above are what was measured before the stop.[/]")
        sys.exit(EXIT_INTERRUPTED)


def _open_runner(artifact, device, backbone, threads, img_size=None):
    from hsnet_deploy.runtime.artifact import open_artifact

    return open_artifact(artifact, device, backbone, img_size=img_size, threads=threads)


@cli.command("eval")
@click.argument("artifact", type=click.Path(dir_okay=False))
@click.option("--dataset", required=True, type=click.Choice(["fss", "pascal", "coco"]),
              help="FSS-1000, PASCAL-5i or COCO-20i, in the authors' layout.")
@click.option("--data-root", required=True, type=click.Path(file_okay=False), help="The authors' --datapath layout.")
@click.option("--splits", "splits_dir", type=click.Path(file_okay=False),
              help="The authors' data/splits folder [default: DATA_ROOT/splits].")
@click.option("--fold", default=0, show_default=True, type=click.IntRange(0, 3),
              help="PASCAL/COCO fold (FSS-1000 has none).")
@click.option("--shots", "-k", default=1, show_default=True, type=click.IntRange(1, 100),
              help="Support images per episode (K).")
@click.option("--episodes", "-n", type=click.IntRange(1), help="Only the first N episodes of the protocol's sequence.")
@click.option("--batch", "-b", default=1, show_default=True, type=click.IntRange(1), help="Episodes per call.")
@click.option("--original-size", is_flag=True,
              help="PASCAL/COCO: score at each query's own size (logits upsampled before the argmax).")
@click.option("--backbone", type=BACKBONE_CHOICE, help="For an authors' checkpoint given as ARTIFACT.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where to run (auto: CUDA where the backend can use it).")
@click.option("--threads", type=click.IntRange(1), help="CPU threads [default: all cores].")
@click.option("--state", "state_path", type=click.Path(dir_okay=False),
              help="Partial totals, saved as the run goes [default: ARTIFACT.eval-state.json].")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its --state file.")
@click.option("--json", "json_path", type=click.Path(), help="Write the result as JSON too.")
@click.option("--report", "report_path", type=click.Path(file_okay=False),
              help="Write an HTML report with plots to this folder (needs the plot extra).")
@max_pixels_option
def eval_cmd(artifact, dataset, data_root, splits_dir, fold, shots, episodes, batch, original_size, backbone, device,
             threads, state_path, resume, json_path, report_path):
    """mIoU and FB-IoU on FSS-1000, PASCAL-5i or COCO-20i, exactly by the authors' protocol.

    Episodes are sampled as the authors do (legacy NumPy RNG, seed 0); IoU sums intersections and unions
    per class over the episodes, then divides (PASCAL's 255 border pixels ignored). Ctrl-C keeps the
    partial totals; --resume continues to the same final numbers.
    """
    from hsnet_deploy import preflight
    from hsnet_deploy.artifacts import sha256_file
    from hsnet_deploy.console import err, out, table
    from hsnet_deploy.data.datasets import build_episodes
    from hsnet_deploy.data.evaluate import StateRefused, evaluate
    from hsnet_deploy.data.paper import PAPER_MIOU, paper_miou
    from hsnet_deploy.info import run_record
    from hsnet_deploy.runtime.bench import machine_info

    state = preflight.eval_state_path(artifact, state_path)
    preflight.evaluate(artifact, state, json_path, resume)
    preflight.backbone_option([artifact], _options_given())
    extremes = None
    if report_path:
        from hsnet_deploy.report import ExtremeEpisodes, require_plotting

        require_plotting(report_path, [("--json", json_path), ("--state", state)])
        extremes = ExtremeEpisodes()
    if threads:
        import torch

        torch.set_num_threads(threads)
    runner = _open_runner(artifact, device, backbone, threads)
    _warn_seeded(runner, artifact)
    img_size = runner.info.img_size
    eset = build_episodes(dataset, data_root, fold=fold, shots=shots, episodes=episodes, splits_dir=splits_dir)
    info = runner.info
    fingerprint = {"artifact_sha256": sha256_file(artifact), "backend": info.backend, "precision": info.precision}
    output_name = "logits" if original_size else "mask"

    def predict_fn(q, s, m):
        return runner.infer({"query_img": q, "support_imgs": s, "support_masks": m})[output_name]

    try:
        with runner:
            result = evaluate(predict_fn, eset, batch=batch, img_size=img_size, original_size=original_size,
                              state_path=state, resume=resume, fingerprint=fingerprint, console=err,
                              on_episode=extremes)
    except (KeyboardInterrupt, click.exceptions.Abort):
        err.print(f"[yellow]Interrupted.[/] The totals of the finished episodes are saved in {state}; resume "
                  f"with:\n  {preflight.resume_command()}")
        sys.exit(EXIT_INTERRUPTED)
    except StateRefused:
        raise
    except UserError as exc:  # a bad file met mid-run: what was counted before it is kept, and said
        raise UserError(f"{exc}{preflight.eval_state_after_error(state)}") from None
    rows = [(f"{cid} {result.class_names.get(cid, '')}".strip(), iou) for cid, iou in result.class_iou.items()]
    names = {"fss": "FSS-1000", "pascal": f"PASCAL-5i fold {fold}", "coco": f"COCO-20i fold {fold}"}
    out.print(f"[bold]{names[dataset]}, {shots}-shot, {result.episodes} episodes[/]")  # a line: never wrapped
    out.print(table("", ["class", "IoU %"], rows))
    out.print(f"runner: {info.label}, {artifact}")
    backbone_name, authors = runner.info.backbone, runner.info.authors_weights
    paper = paper_miou(dataset, backbone_name, shots, authors)
    paper_text = f"   (paper, {backbone_name} {shots}-shot: {paper})" if paper is not None else ""
    out.print(f"mIoU {result.miou:.2f}   FB-IoU {result.fb_iou:.2f}{paper_text}   "
              f"{result.episodes / max(result.seconds, 1e-9):.2f} episodes/s")
    for note in result.notes:
        err.print(f"[dim]note: {note}[/]")
    settings = {"dataset": dataset, "data_root": str(data_root), "fold": fold, "shots": shots, "episodes": episodes,
                "batch": batch, "original_size": original_size, "device": device, "threads": threads}
    report = {**result.to_dict(), "runner": info.label, "artifact": str(artifact),
              "paper_miou": PAPER_MIOU.get((dataset, backbone_name)) if authors else None,
              "machine": machine_info(), **run_record(settings)}
    write_json(json_path, report, "evaluation")
    if report_path:
        from hsnet_deploy.report import write_eval_report

        err.print(f"Report: {write_eval_report(report, extremes, report_path) / 'index.html'}")
    Path(state).unlink(missing_ok=True)  # finished: nothing left to resume


@cli.command()
@click.argument("artifact", type=click.Path(dir_okay=False))
@click.option("--query", required=True, type=click.Path(), help="A query image, or a folder of them.")
@click.option("--support", "supports", multiple=True, nargs=2, type=click.Path(dir_okay=False),
              metavar="IMAGE MASK", help="A support image and its mask; repeat for K shots.",
              callback=lambda _c, _p, v: _support_pairs(v))
@click.option("-o", "--output", required=True, type=click.Path(),
              help="Mask PNG (0/255, the query's size); a folder when --query is a folder.")
@click.option("--overlay", "overlay_path", type=click.Path(), help="Also write the query with the mask drawn on it.")
@click.option("--backbone", type=BACKBONE_CHOICE, help="For an authors' checkpoint given as ARTIFACT.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where to run (auto: CUDA where the backend can use it).")
@click.option("--threads", type=click.IntRange(1), help="CPU threads [default: all cores].")
@click.option("--json", "json_path", type=click.Path(), help="Write what was segmented as JSON too.")
@max_pixels_option
def predict(artifact, query, supports, output, overlay_path, backbone, device, threads, json_path):
    """Segment in QUERY the object shown in the support images (K = number of --support pairs).

    Masks may be palette PNGs, 0/1 or 0/255 grayscale (>= 128 is foreground). Photos are read as viewers
    show them (turned by their EXIF orientation), so masks lie on them as shown. The supports are read and
    preprocessed once for every query in a folder; every query's header is checked before the first runs.
    """
    from hsnet_deploy import predict as predict_lib
    from hsnet_deploy import preflight
    from hsnet_deploy.console import err, progress_bar
    from hsnet_deploy.data.preprocess import check_image_header

    preflight.backbone_option([artifact], _options_given())
    for img, mask in supports:  # headers only: a wrong file is an Error before the model loads
        check_image_header(img)
        check_image_header(mask, "mask")
    queries = predict_lib.list_queries(query, supports)
    inputs = [("ARTIFACT", artifact), *[(f"--support {role}", p) for pair in supports
                                         for role, p in zip(("image", "mask"), pair, strict=True)]]
    mask_fn, overlay_fn = predict_lib.output_paths(output, overlay_path, queries, Path(query).is_dir(), inputs,
                                                   [("--json", json_path)])
    runner = _open_runner(artifact, device, backbone, threads)
    _warn_seeded(runner, artifact)
    img_size = runner.info.img_size
    loaded = predict_lib.load_supports(list(supports), img_size)
    for path in loaded.empty:
        err.print(f"[yellow]Warning: {path}: the support mask is empty; that shot cannot show the object[/]")
    for line in loaded.warnings:
        err.print(f"[yellow]Warning: {line}[/]")
    for line in loaded.notes:
        err.print(f"[dim]note: {line}[/]")
    records: list[dict] = []
    try:
        with runner, progress_bar(transient=len(queries) == 1) as bar:
            task = bar.add_task("predict", total=len(queries), status="")
            predict_lib.predict(runner, queries, loaded, img_size, mask_fn, overlay_fn,
                                tick=lambda: bar.advance(task), written=records)
    except (UserError, KeyboardInterrupt, click.exceptions.Abort):
        if records:  # the finished queries' files are written: say which, and keep their JSON
            _print_predictions(records)
            err.print(f"Stopped after {len(records)} of {len(queries)} queries: their masks are written.")
            write_json(json_path, {"artifact": str(artifact), "shots": len(supports), "complete": False,
                                   "results": records}, "predictions so far")
        raise
    _print_predictions(records)
    write_json(json_path, {"artifact": str(artifact), "shots": len(supports), "complete": True, "results": records},
               "predictions")


def _print_predictions(records: list[dict]) -> None:
    from hsnet_deploy.console import err, out

    for r in records:
        out.print(f"{r['query']} -> {r['mask']}  foreground {100 * r['foreground_fraction']:.1f}%"
                  + (f", overlay {r['overlay']}" if "overlay" in r else ""))
        for note in r.get("notes", []):
            err.print(f"[dim]note: {note}[/]")


def _support_pairs(pairs):
    from hsnet_deploy.preflight import support_pairs

    try:
        return support_pairs(pairs)
    except UserError as exc:
        raise click.UsageError(str(exc)) from None


def _warn_seeded(runner, artifact) -> None:
    from hsnet_deploy.console import err
    from hsnet_deploy.info import seeded_weights_warning

    warning = seeded_weights_warning(runner.info.metadata, artifact)
    if warning:
        err.print(f"[yellow]Warning: {warning}[/]")


@cli.command()
@click.argument("artifact", required=False, type=click.Path(dir_okay=False))
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the same facts as JSON too.")
def info(artifact, json_path):
    """What this machine can run, or what ARTIFACT is, without running anything.

    \b
    No ARTIFACT: the backends (PyTorch, ONNX Runtime and its providers,
    TensorRT), the devices and the installed versions.
    ARTIFACT: its kind, backbone, image size, precision, source weights,
    tool versions, export layout and, for FP16/INT8 variants, the accuracy
    gate's report, what stayed FP32 or was quantised, and the episodes.
    """
    from hsnet_deploy import info as info_lib
    from hsnet_deploy.console import kv_table, out
    from hsnet_deploy.outputs import check_outputs

    check_outputs([("--json", json_path)], [("ARTIFACT", artifact)])
    facts = info_lib.describe(artifact)
    rows = info_lib.artifact_rows(facts) if artifact else info_lib.environment_rows(facts)
    out.print(kv_table(f"{Path(artifact).name}" if artifact else "this machine", rows))
    write_json(json_path, facts, "facts")

@cli.command()
@click.argument("artifact", type=click.Path(dir_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address the HTTP proxy listens on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535), help="TCP port to listen on.")
@click.option("--replicas", default=1, show_default=True, type=click.IntRange(1), help="Model replicas.")
@click.option("--gpus-per-replica", default=0.0, show_default=True, type=click.FloatRange(0),
              help="GPUs each replica reserves (fractions share a GPU).")
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(1),
              help="Episodes batched into one call (1 = no batching); capped by a plan's profile.")
@click.option("--batch-wait-ms", default=5.0, show_default=True, type=click.FloatRange(0),
              help="How long a replica waits to fill a batch.")
@click.option("--address", default=None, help="Join this Ray cluster (e.g. ray://head:10001 or head:6379) "
              "instead of starting a local Ray.")
@click.option("--max-shots", default=10, show_default=True, type=click.IntRange(1),
              help="Largest K a support set may have (a plan's profile caps it).")
@click.option("--max-sets", default=1000, show_default=True, type=click.IntRange(1),
              help="Support sets kept (least recently used evicted).")
@click.option("--max-store-mb", default=512.0, show_default=True, type=click.FloatRange(0.001),
              help="Memory the kept support sets may take.")
@click.option("--max-upload-mb", default=20.0, show_default=True, type=click.FloatRange(0.001),
              help="Largest request body (413 above).")
@click.option("--max-pixels", default=4096 * 4096, show_default=True, type=click.IntRange(1),
              help="Largest width x height of one uploaded image or mask (413 above).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where each replica runs (auto: CUDA where the backend can use it).")
@click.option("--threads", type=click.IntRange(1), help="CPU threads (and Ray CPUs) per replica [default: 1 Ray CPU, "
              "all threads].")
@click.option("--backbone", type=BACKBONE_CHOICE, help="For an authors' checkpoint given as ARTIFACT.")
def serve(artifact, host, port, replicas, gpus_per_replica, max_batch, batch_wait_ms, address, max_shots, max_sets,
          max_store_mb, max_upload_mb, max_pixels, device, threads, backbone):
    """Serve segmentation over HTTP on Ray Serve (extra: pip install -e ".[serve]").

    \b
    POST /support-sets  multipart: K `image` + K `mask` files -> {"id": ...}
    POST /segment       multipart: `image` file + `support_set`
                        -> mask PNG (0/255, query size); ?format=json ->
                        {"height", "width", "foreground_fraction", "rle"}
    GET  /health, GET /info

    Bad requests get JSON {"error": ...} with 400/404/413; a request in flight on a replica that dies
    gets a retriable 503. Without --address a local Ray is started; Ctrl-C stops the service.
    """
    from hsnet_deploy import preflight
    from hsnet_deploy.console import err
    from hsnet_deploy.runtime.artifact import check_device_here, inspect_artifact
    from hsnet_deploy.serve.launch import run_service

    inspect_artifact(artifact)  # a missing or damaged file is an Error now, not a failing replica later
    preflight.backbone_option([artifact], _options_given())
    if address is None:  # a cluster's replicas may have the GPUs this machine lacks
        check_device_here(artifact, device)
    from hsnet_deploy.serve.config import ServeConfig

    config = ServeConfig(str(Path(artifact).resolve()), device, backbone, threads, max_batch, batch_wait_ms,
                         max_shots, max_sets, max_store_mb, max_upload_mb, max_pixels)
    run_service(config, host=host, port=port, replicas=replicas, gpus_per_replica=gpus_per_replica,
                address=address, say=lambda m: err.print(m, highlight=False))


@cli.command("triton-repo")
@click.argument("artifact", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False),
              help="Repository folder; the model goes to OUTPUT/hsnet/.")
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(1),
              help="Triton's max_batch_size (B); a plan's profile caps it.")
@click.option("--instances", default=1, show_default=True, type=click.IntRange(1), help="Model instances.")
@click.option("--kind", type=click.Choice(["gpu", "cpu"]), default="gpu", show_default=True,
              help="Where the instances run (instance_group kind).")
@click.option("--accelerator", type=click.Choice(["tensorrt", "cuda", "none"]), default="tensorrt",
              show_default=True, help="ONNX models: ONNX Runtime's GPU execution accelerator in Triton.")
@click.option("--queue-delay-us", default=2000, show_default=True, type=click.IntRange(0),
              help="dynamic_batching: longest wait to fill a batch.")
def triton_repo(artifact, output, max_batch, instances, kind, accelerator, queue_delay_us):
    """Write a model repository for NVIDIA Triton Inference Server (OUTPUT/hsnet/config.pbtxt + 1/model.*).

    An ONNX model is served by Triton's ONNX Runtime backend, a TensorRT plan by its TensorRT backend (on the
    GPU it was built for). Start the server with NVIDIA's container, see README.
    """
    from hsnet_deploy.console import out
    from hsnet_deploy.serve.triton import write_triton_repo

    if kind == "cpu" and accelerator != "none" and "--accelerator" in _options_given():
        raise UserError(f"--accelerator {accelerator} with --kind cpu: Triton's GPU execution accelerators need GPU "
                        "instances; drop --accelerator or use --kind gpu")
    repo = write_triton_repo(artifact, output, max_batch=max_batch, instances=instances, kind=kind,
                             accelerator=accelerator if kind == "gpu" else "none", queue_delay_us=queue_delay_us)
    out.print(f"[green]Wrote[/] {repo.config_path} and {repo.model_path} ({repo.platform}, max_batch_size "
              f"{repo.max_batch_size})", highlight=False)
    out.print(f"{repo.needs}: pick the container release that has it.", highlight=False)
    for path in repo.removed:
        out.print(f"Removed {path}, an earlier model of the other kind.", highlight=False)
    if repo.other_versions:
        out.print(f"note: {repo.config_path.parent} also holds version folder(s) {', '.join(repo.other_versions)}; "
                  "the config serves version 1 only.", highlight=False)


def main() -> None:
    """Entry point: UserError -> `Error: ...` exit 2; failed gate -> exit 1; anything else -> exit 1, no traceback
    unless HSNET_DEPLOY_DEBUG is set. Ctrl-C exits 130; SIGTERM takes the same paths and exits 143."""
    with sigterm_as_interrupt() as signals:
        try:
            _run_cli(signals)
            if signals.stopped():  # a stop that library code swallowed: the command ran on, but was asked to stop
                _say_stopped(signals)
                sys.exit(EXIT_INTERRUPTED)
        except SystemExit as exc:
            if signals.received and exc.code == EXIT_INTERRUPTED:
                raise SystemExit(EXIT_TERMINATED) from None
            raise


def _say_stopped(signals: SignalState, ctrl_c: str = "Interrupted.") -> None:
    click.echo("Terminated (SIGTERM)." if signals.received else ctrl_c, err=True)


def _run_cli(signals: SignalState) -> None:
    try:
        cli.main(standalone_mode=False, prog_name="hsnet-deploy")
    except click.exceptions.Abort:  # click's form of Ctrl-C (and of SIGTERM, see termination.py)
        _say_stopped(signals, ctrl_c="Aborted.")
        sys.exit(EXIT_INTERRUPTED)
    except click.UsageError as exc:  # a bad option value or a missing argument: one line, like every refusal
        if isinstance(exc, getattr(click.exceptions, "NoArgsIsHelpError", ())):  # `hsnet-deploy` alone: the help
            exc.show()
        else:
            hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
            click.echo(f"Error: {exc.format_message().rstrip('.')}{hint}", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except UserError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(2)
    except GateFailure as exc:
        click.echo(f"Failed: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        _say_stopped(signals)
        sys.exit(EXIT_INTERRUPTED)
    except Exception as exc:  # noqa: BLE001 - the last line of defence: a bug, reported as such
        if signals.stopped():  # the stop, turned into another error by library code it landed in
            _say_stopped(signals)
            sys.exit(EXIT_INTERRUPTED)
        if os.environ.get("HSNET_DEPLOY_DEBUG"):
            traceback.print_exc()
        click.echo(f"Internal error: {type(exc).__name__}: {exc} (set HSNET_DEPLOY_DEBUG=1 for the traceback)",
                   err=True)
        sys.exit(1)
