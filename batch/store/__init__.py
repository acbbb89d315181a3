"""Storage: fsspec I/O with retries, the metadata schema, the exactly-once commit protocol, output formats."""
