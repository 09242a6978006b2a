"""The appliance control plane: CLI, config, state store, supervisor, status."""

__version__ = "0.1.0"
