"""Which `build-engine` options each backend's builder uses: an option the chosen backend would ignore is
refused (`Error:`, exit 2) instead of silently dropped."""

from __future__ import annotations

from hsnet_deploy.errors import UserError

# Options only one backend reads (CLI spelling).
BACKEND_OPTIONS = {
    "onnxruntime": {"--device"},
    "tensorrt": {"--max-batch", "--max-shots", "--opt-batch", "--opt-shots", "--workspace", "--timing-cache",
                 "--version-compatible", "--tf32", "--variant-onnx"},
}
# Options only one precision reads.
PRECISION_OPTIONS = {
    "int8": {"--calib-method", "--quantize", "--calib-episodes"},
    "fp16": {"--fp16-keep"},
}
VARIANT_ONLY = {"--gate-episodes", "--gate-max-miou-drop", "--gate-min-agreement", "--gate-min-worst-agreement",
                "--gate-min-sign-agreement", "--gate-max-logit-error", "--seed", "--fold"}  # --calib-data: preflight.build_engine


def check_build_options(backend: str, precision: str, given: set[str]) -> None:
    """Refuse each option in `given` (those the user set) that this backend and precision do not use."""
    for other, options in BACKEND_OPTIONS.items():
        if other != backend and (used := sorted(given & options)):
            raise UserError(f"{', '.join(used)}: for --backend {other}, not {backend}; "
                            f"{backend} would ignore {'it' if len(used) == 1 else 'them'}")
    for other, options in PRECISION_OPTIONS.items():
        if other != precision and (used := sorted(given & options)):
            flag = "FP32" if precision == "fp32" else f"--{precision}"
            raise UserError(f"{', '.join(used)}: for --{other} only; {flag} would ignore "
                            f"{'it' if len(used) == 1 else 'them'}")
    if backend == "onnxruntime" and precision != "fp32" and "--device" in given:
        raise UserError(f"--device: picks the device an FP32 build is optimised for; the --{precision} variant is a "
                        "portable ONNX model that any device runs, so it would be ignored (optimise the variant "
                        "with a second, plain build-engine run if you want that)")
    if precision == "fp32" and (used := sorted(given & VARIANT_ONLY)):
        raise UserError(f"{', '.join(used)}: for --fp16 or --int8 (the accuracy gate); an FP32 build would "
                        "ignore it")
