"""Taking a trained encoder away: ``export`` (safetensors, TorchScript, ONNX and a model
card) and :func:`~pipeline.export.encoder.load_encoder`, the Python API."""
