"""The real-time endpoint (``sdbatch serve``): :mod:`batch.serve.protocol` (requests and responses, pure) and
:mod:`batch.serve.app` (the Ray Serve application around the batch job's sampler)."""
