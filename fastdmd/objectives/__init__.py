"""Training methods, one module each (METHODS.md)."""
