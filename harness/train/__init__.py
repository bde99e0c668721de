"""Training: the worker loop (loop.py), its checkpoints (checkpoint.py) and sessions
(session.py), the Ray driver (driver.py) and the ``segrepro train`` command (command.py)."""
