"""``erllama-gateway``: an HTTP server in front of the broker speaking the OpenAI API (``/v1/...``),
with ``/health`` and Prometheus ``/metrics``. ``create_app`` builds the ASGI app; ``main`` runs it."""
