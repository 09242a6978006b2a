"""Bring-up: the steps from a bare host to a serving appliance (setup, image, cdi, weights, serve,
agent, status) as data, so `appliance up --dry-run` prints exactly what `appliance up` and
scripts/appliance-up.sh do.

facts.py probes what only this host can say (or says "unknown" for a recorded host), steps.py
turns (host, config, plan, facts, options) into the steps (pure), run.py executes the steps
`appliance up` owns (image, cdi, weights) and hands the serve step back to it.
"""
