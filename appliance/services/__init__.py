"""The appliance's own processes: the supervisor that keeps its services up (supervisor.py), its
run state (lifecycle lock, pid file, services.json: run_state.py), which process holds a listening
port (listeners.py), and the systemd and Quadlet units that do the same job under a service
manager (systemd.py, quadlet.py)."""
