"""hsnet-deploy's command line: parse, call the library, print. No logic of its own."""

from __future__ import annotations

import logging
import os
import sys
import traceback
import warnings
from pathlib import Path

import click

from hsnet_deploy import __version__
from hsnet_deploy.errors import GateFailure, UserError

BACKBONE_CHOICE = click.Choice(["vgg16", "resnet50", "resnet101"])
CACHE_DIR = Path(os.environ.get("HSNET_DEPLOY_CACHE", Path.home() / ".cache" / "hsnet-deploy"))


def _quiet_exporters() -> None:
    """torch.onnx logs a warning per missing torchvision op and onnxscript chats; users need none of it."""
    warnings.filterwarnings("ignore")
    for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript", "torch.fx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TORCH_LOGS", "-all")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="hsnet-deploy")
def cli() -> None:
    """HSNet few-shot segmentation, deployed: export a PyTorch HSNet to ONNX (verified against PyTorch),
    build FP32/FP16/INT8 engines for ONNX Runtime or TensorRT, and benchmark, evaluate and run them.

    \b
    Typical flow:
      hsnet-deploy export --backbone resnet50 --checkpoint best_model.pt -o hsnet.onnx
      hsnet-deploy build-engine hsnet.onnx --backend onnxruntime -o hsnet.ort.onnx
      hsnet-deploy bench hsnet.onnx hsnet.ort.onnx
      hsnet-deploy predict hsnet.onnx --query q.jpg --support s.jpg s.png -o mask.png
    """


def load_model(backbone: str | None, checkpoint: str | None, seed: int):
    """The model and a description of its weights for metadata: a checkpoint's sha256, or the seed."""
    from hsnet_deploy.artifacts import sha256_file
    from hsnet_deploy.console import err
    from hsnet_deploy.model import load_checkpoint, seeded_model

    if checkpoint:
        model = load_checkpoint(checkpoint, backbone)
        return model, {"weights": "checkpoint", "checkpoint": Path(checkpoint).name,
                       "checkpoint_sha256": sha256_file(checkpoint)}
    if backbone is None:
        raise UserError("--backbone is required when no --checkpoint is given")
    err.print(f"[yellow]No --checkpoint: using SEEDED RANDOM weights (seed {seed}); the outputs are meaningless "
              "for segmentation, fine for checking export and speed.[/]")
    return seeded_model(backbone, seed), {"weights": "seeded-random", "seed": seed}


def write_json(path: str | None, obj: object) -> None:
    if path:
        from hsnet_deploy.artifacts import write_json_atomic

        write_json_atomic(path, obj)


@cli.command()
@click.option("--backbone", type=BACKBONE_CHOICE, help="Backbone; recorded in our own checkpoints, required otherwise.")
@click.option("--checkpoint", type=click.Path(dir_okay=False), help="The authors' best_model.pt or our own format.")
@click.option("--img-size", default=400, show_default=True, help="H = W fixed in the graph (B and K stay dynamic).")
@click.option("--opset", default=None, type=int, help="ONNX opset (default 20, at least 18).")
@click.option("--seed", default=0, show_default=True, help="Seed for random weights when no --checkpoint is given.")
@click.option("-o", "--output", required=True, type=click.Path(), help="The .onnx file to write (atomically).")
@click.option("--json", "json_path", type=click.Path(), help="Also write the export report as JSON.")
def export(backbone, checkpoint, img_size, opset, seed, output, json_path):
    """Export HSNet to ONNX, every center-pivot 4D conv as reshaped 2D convs, and verify it.

    The written model is checked against eager PyTorch in ONNX Runtime on random episodes (B = 1, 2;
    K = 1, 2, 3; filled and pixel-noise masks), on the logits AND the three hypercorrelation tensors.
    Above tolerance (max |diff| > 1e-4 of max |reference|) nothing is written and the exit status is 1.
    """
    import time

    from hsnet_deploy.artifacts import check_output_path
    from hsnet_deploy.console import err, out, table
    from hsnet_deploy.export import DEFAULT_OPSET, export_onnx
    from hsnet_deploy.model import check_image_size

    _quiet_exporters()
    check_output_path(output)
    if backbone:
        check_image_size(backbone, img_size, img_size)
    model, source = load_model(backbone, checkpoint, seed)
    started = time.perf_counter()
    steps = iter(range(1, 10))

    def step(message: str) -> None:
        err.print(f"[bold]\\[{next(steps)}/4][/] {message}  [dim]({time.perf_counter() - started:.0f}s)[/]")

    report = export_onnx(model, output, img_size, opset or DEFAULT_OPSET, source, step=step)
    rows = []
    for c in report.checks:
        for e in c.errors:
            rows.append((f"B={c.batch} K={c.shots} {c.masks}", e.name, e.max_abs, e.mean_abs, e.rel, c.mask_agreement))
    out.print(table("Verification: ONNX Runtime (CPU) vs eager PyTorch",
                    ["episode", "tensor", "max |diff|", "mean |diff|", "max / max|ref|", "mask agreement"], rows))
    write_json(json_path, report.to_dict())
    if not report.passed:
        raise GateFailure(
            f"verification failed: worst relative error {max(c.worst_rel() for c in report.checks):.2e} "
            f"> {report.tolerance:.0e}; {output} was not written"
        )
    out.print(f"[green]Wrote {output}[/]: {report.file_bytes / 2**20:.1f} MiB, {report.nodes} nodes "
              f"({report.op_counts.get('Conv', 0)} Conv, all 2D), opset {report.opset}, "
              f"worst relative error {max(c.worst_rel() for c in report.checks):.1e}, {report.seconds:.0f}s")


def main() -> None:
    """Entry point: UserError -> `Error: ...` exit 2; failed gate -> exit 1; anything else -> exit 1, no traceback
    unless HSNET_DEPLOY_DEBUG is set."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
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
        click.echo("Interrupted.", err=True)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - the last line of defence: a bug, reported as such
        if os.environ.get("HSNET_DEPLOY_DEBUG"):
            traceback.print_exc()
        click.echo(f"Internal error: {type(exc).__name__}: {exc} (set HSNET_DEPLOY_DEBUG=1 for the traceback)",
                   err=True)
        sys.exit(1)
