"""diffunet.training."""
