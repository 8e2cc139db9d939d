"""Training stages: each a top-to-bottom recipe over the same data, model and run-folder parts."""
