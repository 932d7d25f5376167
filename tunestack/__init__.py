"""tunestack: the one installed command over the three stages (train, export, serve) and the registry."""
