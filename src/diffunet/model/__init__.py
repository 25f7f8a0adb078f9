"""diffunet.model."""
