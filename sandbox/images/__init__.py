"""Sandbox images, built with no registry: the debootstrap base (base.py), what every layer on
top of it shares (layers.py) and the OpenClaw layer (openclaw.py)."""
