"""The in-sandbox supervisor (PID 1). Stdlib-only scripts, run as `python3 -I init.py` inside the
sandbox from a read-only mount; the host only locates this directory, it never imports them."""
