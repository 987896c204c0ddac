"""A subject's life in the service: its records, its scheduler, its erasure and its webhooks."""
