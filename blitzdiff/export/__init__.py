"""Export to ONNX and the runtimes that run the exported graphs (ARCHITECTURE.md contract 7). Needs the `export`
extra (onnx, onnxscript, onnxruntime); the engine never imports this package."""

from .manifest import read_manifest
from .onnx import export_onnx
from .session import OnnxGraph

__all__ = ["OnnxGraph", "export_onnx", "read_manifest"]
