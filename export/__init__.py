"""The export stage: a trained run's fixed-sparsity network to TFLite (LiteRT, TFLite Micro) and ONNX."""
