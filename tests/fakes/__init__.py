"""Fakes at outside boundaries (NVML, ...) that raise the real libraries' exceptions."""
