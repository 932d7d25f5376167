"""The WSGI server's process lifecycle: gunicorn's worker, the drain on SIGTERM, request-body deadlines."""
