"""HTTP API (served by `tierbase up`) and the Python SDK client over it."""
