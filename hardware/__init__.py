"""GPU inventory, telemetry, host detection and the serving planner (imports nothing of ours)."""
