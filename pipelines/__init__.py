"""KFP pipelines, their compilation and local execution, and the `reelforge` CLI."""
