"""Pure compilers from a sandbox Policy to what Podman, runc and the in-sandbox supervisor read."""
