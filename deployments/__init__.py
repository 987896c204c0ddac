"""Ray Serve entry points (thin: they import the ``dreamblend_ray`` package, never the reverse)."""
