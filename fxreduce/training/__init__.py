"""Training-loop parts that plug rewritten models into the user's own loop (each technique's module)."""
