"""The gateway: HTTP, settings, dispatch, audit and the CLI around the pure policy engine."""
