"""Read-only operations that must work with nothing running: `appliance doctor` (doctor/),
`appliance status` (status.py) and the budget and usage reports (usage.py)."""
