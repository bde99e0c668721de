"""Training, in rooms of its own:

- ``loop.py``: the iteration loop every worker runs (model, sharded loader, forward/backward/
  update with loss scaling where fp16 needs it, periodic validation and checkpoints);
- ``checkpoint.py``: what a checkpoint holds, writing it, reading it back, whether it is
  usable and whether a run may resume from it;
- ``session.py``: what the loop needs from whatever runs it (a Ray Train worker or this
  process), including the hooks tests and ``gpu-check`` run after every iteration;
- ``driver.py``: ``train()``, the Ray driver: holds the run directory, resumes from the newest
  usable checkpoint of any attempt, adds up wall time over attempts, writes the result, and
  ``finished_result`` says whether a saved result can be trusted;
- ``command.py``: ``segrepro train``.
"""
