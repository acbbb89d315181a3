"""Planning: manifest reading and validation, seeds, input locations; rows in, per-image items out."""
