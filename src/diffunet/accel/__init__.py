"""diffunet.accel."""
