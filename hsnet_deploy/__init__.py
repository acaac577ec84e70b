"""hsnet-deploy: HSNet few-shot segmentation, exact in PyTorch, exported, quantised and run fast."""

__version__ = "0.1.0"
