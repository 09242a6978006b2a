"""Packaging: the offline bundle, the wheelhouse, host packages, and the appliance images
(recipes/ and their builder)."""
