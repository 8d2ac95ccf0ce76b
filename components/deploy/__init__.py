"""Deploy stage: smoke-test a registered version behind `reelforge serve` locally, or roll it out on Kubernetes."""
