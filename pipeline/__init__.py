"""The pipeline around ssl_models: data preparation, Ray Train pretraining, evaluation,
sweeps and the command line."""
