"""ADE20K data: dataset (``ade20k``), recipe transforms (``transforms``), fingerprints, and the
``segrepro data`` commands (check, download, synth, bench: each ``add_arguments(parser)`` and
``run(args) -> int``).

Bottom of the import graph: nothing here imports the rest of the project but
``harness.config.InputError`` (the base of ``DataError``). The package itself imports nothing,
so a command that needs only one module does not pay for torchvision.
"""
