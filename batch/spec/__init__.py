"""The job spec: typed YAML configuration, validated loudly (pydantic, extra=forbid)."""
