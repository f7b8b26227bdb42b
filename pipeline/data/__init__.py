"""Images in and out: locations, sources, Parquet shards, the prepare job, the training
stream (shards -> decoded images -> views) with its ledger, and frozen-encoder features."""
