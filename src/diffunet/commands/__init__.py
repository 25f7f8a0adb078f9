"""One module per `diffunet` command (see `diffunet.cli`)."""
