"""Register stage: the tuned model as an MLflow pyfunc model version with lineage tags."""
