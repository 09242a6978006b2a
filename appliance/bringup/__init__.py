"""Bring-up: the steps from a bare host to a serving appliance (setup, image, cdi, weights, serve,
agent, status) as data, so `appliance up --dry-run` prints exactly what `appliance up` and
scripts/appliance-up.sh do. It orchestrates packaging (image, weights), services (the
supervisor) and the host's probes; the doctor reads its probes from here, never the reverse.

facts.py (and image_facts.py) probe what only this host can say (or say "unknown" for a recorded
host); model.py holds the Step and Bringup data; steps.py turns (host, config, plan, facts,
options) into the steps (pure), prepare_steps.py the image, CDI and weights steps, commands.py
the argv they name; run.py executes the steps `appliance up` owns (image, cdi, weights) and hands
the serve step back to it; wait.py is up's wait for the supervisor's verdict.
"""
