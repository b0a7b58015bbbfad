"""Control plane: metadata, branch operations, reconcile."""
