"""Register stage: the distilled student and its teacher as MLflow pyfunc versions, the promotion gate, aliases."""
