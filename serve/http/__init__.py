"""The HTTP layer: the Flask app (state, auth, errors), its routes, the OpenAPI description, the playground."""
