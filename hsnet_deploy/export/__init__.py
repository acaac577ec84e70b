"""torch -> ONNX export of HSNet, verified against eager PyTorch at export time."""

from hsnet_deploy.export.onnx_export import DEFAULT_OPSET, ExportReport, check_opset, export_onnx

__all__ = ["DEFAULT_OPSET", "ExportReport", "check_opset", "export_onnx"]
