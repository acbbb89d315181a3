"""Pure sampling: tensors in, tensors out (no Ray, no storage)."""
