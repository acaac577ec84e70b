"""What each command refuses before it starts work: option combinations that make no sense, inputs a
command cannot use, outputs that would replace an input. Every refusal is a UserError (`Error:`, exit 2)
naming the option or file, raised before minutes of export, calibration or benchmarking are spent.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from hsnet_deploy.errors import UserError
from hsnet_deploy.outputs import check_outputs


def precision_flags(fp16: bool, int8: bool) -> str:
    """`--fp16 --int8` together would build one of them silently: refuse."""
    if fp16 and int8:
        raise UserError("--fp16 and --int8 exclude each other: build one variant per command")
    return "fp16" if fp16 else "int8" if int8 else "fp32"


def build_options(backend: str, precision: str, given: set[str]) -> None:
    """An option the chosen backend or precision would ignore is refused, not silently dropped."""
    from hsnet_deploy.runtime.build_options import check_build_options

    check_build_options(backend, precision, given)


def variant_options(precision: str, calib_data: str | None, given: set[str], fp16_keep: str) -> None:
    """Variant options that would be ignored or would break the variant: --fold without a PASCAL or COCO
    calibration layout (the only ones with folds), and an --fp16-keep without `mask`: the support-mask path
    decides, through residues down to 6e-11, which support positions count, and FP16 cannot hold that."""
    if "--fold" in given:
        from hsnet_deploy.calibration.episodes import detect_layout

        layout = detect_layout(Path(calib_data)) if calib_data and Path(calib_data).is_dir() else None
        if layout not in ("pascal", "coco"):
            raise UserError(f"--fold picks the PASCAL-5i / COCO-20i fold of --calib-data; here "
                            f"({'no --calib-data' if not calib_data else f'a {layout} layout'}) it would be ignored")
    groups = {g.strip() for g in fp16_keep.split(",") if g.strip()}
    if precision == "fp16":
        from hsnet_deploy.calibration.fp16 import GROUP_FINDERS

        unknown = sorted(groups - set(GROUP_FINDERS))
        if unknown:
            raise UserError(f"--fp16-keep {fp16_keep}: unknown group(s) {', '.join(unknown)}; expected some of "
                            f"{', '.join(GROUP_FINDERS)}")
    if precision == "fp16" and "mask" not in groups:
        raise UserError(f"--fp16-keep {fp16_keep}: `mask` is required (the support-mask path must stay FP32); "
                        "add it to the list")


def build_engine(
    model: str, output: str, precision: str, backend: str, calib_data: str | None, variant_onnx: str | None,
    json_path: str | None, timing_cache: str | None,
) -> None:
    """Refuse what `build-engine` cannot honour; the model's own checks follow in the builders."""
    from hsnet_deploy.runtime.artifact import read_onnx_meta

    if calib_data and precision == "fp32":
        raise UserError("--calib-data is used by --int8 (calibration and gate) and --fp16 (gate episodes); "
                        "without either it would be ignored")
    if precision == "int8" and not calib_data:
        raise UserError("--int8 needs --calib-data DIR (episodes to calibrate on and to gate with)")
    if variant_onnx and (backend != "tensorrt" or precision == "fp32"):
        raise UserError("--variant-onnx is where --backend tensorrt keeps its --fp16/--int8 ONNX; "
                        "here it would be ignored")
    if calib_data and not Path(calib_data).is_dir():
        raise UserError(f"{calib_data}: --calib-data folder not found")
    meta = read_onnx_meta(Path(model))
    if meta.get("ort_version") or meta.get("ort_device"):
        raise UserError(f"{model}: is an ONNX Runtime-optimised model (its fused nodes are ONNX Runtime's own); "
                        "build from the FP32 export that `hsnet-deploy export` wrote")
    if meta.get("precision", "fp32") != "fp32" and precision != "fp32":  # a gated variant builds as it is
        raise UserError(f"{model}: is already an {meta['precision'].upper()} variant; make the "
                        f"{precision.upper()} variant from the FP32 export")
    outputs = [("-o", output)]
    if backend == "tensorrt":
        outputs.append(("the plan's metadata file", f"{output}.json"))
        if precision != "fp32":
            outputs.append(("--variant-onnx", variant_onnx or f"{output}.onnx"))
    outputs.append(("--json", json_path))
    inputs = [("MODEL", model), ("--timing-cache", timing_cache)]
    check_outputs(outputs, inputs)


def bench(artifacts: list[str], device: str, cuda_graph: bool, json_path: str | None, given: set[str]) -> None:
    if cuda_graph and device == "cpu":
        raise UserError("--cuda-graph captures ONNX Runtime's CUDA run; with --device cpu it would be ignored")
    check_outputs([("--json", json_path)], [("ARTIFACT", a) for a in artifacts])
    if "--img-size" in given and artifacts:
        raise UserError("--img-size sets the size of the embedded default model (bench with no ARTIFACT); with "
                        "ARTIFACTs it would be ignored: the run takes the first ONNX model's or plan's size, or the "
                        "authors' 400 for checkpoints alone")
    if "--backbone" in given and not artifacts:
        raise UserError("--backbone names an authors' checkpoint's backbone; with no ARTIFACT bench runs the "
                        "embedded default (resnet50), so it would be ignored")
    backbone_option(artifacts, given)


def backbone_option(artifacts: list[str], given: set[str]) -> None:
    """--backbone tells an authors' checkpoint (which does not record it) its backbone. ONNX models and TensorRT
    plans record theirs, so with none but those it would be ignored: refused, as the README promises."""
    if "--backbone" not in given or not artifacts:
        return
    from hsnet_deploy.runtime.artifact import inspect_artifact

    if all(inspect_artifact(a).kind != "checkpoint" for a in artifacts):
        raise UserError(f"--backbone is for an authors' checkpoint, which does not record its backbone; "
                        f"{artifacts[0]} records its own, so it would be ignored")


# The export's dense support-major mixing weights grow with the 4th power of the size: above 768 the squeezed support
# grid passes 3x3, so they outgrow the convs they replace, and memory soon runs out (2240 failed at 14 GB, 2048
# crashed; seen 2026-11-27 on the 2-core CPU machine).
MAX_EXPORT_SIZE = 768


def export(output: str, json_path: str | None, checkpoint: str | None, img_size: int = 400) -> None:
    if img_size > MAX_EXPORT_SIZE:
        raise UserError(f"--img-size {img_size}: exports go up to {MAX_EXPORT_SIZE} (above it the dense mixing weights "
                        "outgrow the convs they replace and the export needs tens of GB); HSNet's own size is 400")
    check_outputs([("-o", output), ("--json", json_path)], [("--checkpoint", checkpoint)])


def eval_state_path(artifact: str, state: str | None) -> str:
    """The evaluation state's path: --state, else beside the artifact (never derived from --json, so adding
    --json to a resumed run still finds its state). A read-only artifact folder gets a hint, not a dead end."""
    if state:
        return state
    path = Path(f"{artifact}.eval-state.json")
    folder = path.parent
    if folder.is_dir() and not os.access(folder, os.W_OK):
        raise UserError(f"{path}: the artifact's folder {folder} is not writable, so the evaluation state "
                        "(kept for --resume) cannot go beside it; give --state PATH in a writable folder")
    return str(path)


def evaluate(artifact: str, state: str, json_path: str | None, resume: bool = False) -> None:
    """Outputs apart from the artifact, and an interrupted run's state never replaced unasked: without --resume
    the first save would overwrite the totals a forgotten --resume could have continued from."""
    check_outputs([("--state", state), ("--json", json_path)], [("ARTIFACT", artifact)])
    if resume:
        return
    from hsnet_deploy.data.evaluate import interrupted_run

    progress = interrupted_run(state)
    if progress is not None:
        raise UserError(f"{state}: holds an interrupted run ({progress.name}: {progress.counted} of {progress.total} "
                        "episodes counted); continue it with --resume, or delete the file to start over")


def eval_state_after_error(state: str) -> str:
    """What an `eval` stopped by a bad file mid-run left: the totals counted before it, kept for --resume once the
    file is fixed (said, since the next run without --resume is refused), or, with nothing counted, no state."""
    from hsnet_deploy.data.evaluate import interrupted_run

    try:
        progress = interrupted_run(state)
    except UserError:
        return ""
    if progress is None:
        return ""
    if progress.counted == 0:
        Path(state).unlink(missing_ok=True)
        return ""
    return (f"\nThe totals of the {progress.counted} episodes before it are saved in {state}; once the file is fixed, "
            f"continue with:\n  {resume_command()}")


def resume_command(argv: list[str] | None = None) -> str:
    """The command line that resumes this `eval` run: the same arguments plus --resume."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "--resume" not in args:
        args.append("--resume")
    return shlex.join(["hsnet-deploy", *args])


def support_pairs(pairs: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    """`--support IMG MASK` takes two values: a pair whose mask is missing swallows the next option
    (`--support s.jpg -o m.png` reads `-o` as the mask). Say so, instead of `Missing option '-o'`."""
    for image, mask in pairs:
        if mask.startswith("-") and not Path(mask).exists():
            raise UserError(f"--support {image}: its MASK is missing (the next argument, {mask!r}, is an option); "
                            "give --support IMAGE MASK")
    return pairs
