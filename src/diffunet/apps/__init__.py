"""diffunet.apps."""
