"""Kubernetes manifests checked offline: schema validation (`schema`), policy rules (`policy`), and the
serving objects of the committed kustomize base (`serving`)."""
