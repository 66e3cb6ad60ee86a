"""The jobs balancectl ships, and its default jobs file (``default.toml``)."""
