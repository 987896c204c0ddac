"""What the service tells its operators: metrics (``catalog``, ``metrics``), request ids and logs
(``context``, ``logs``). docs/operations.md ("Metrics", "Request ids and logs") is the guide."""
