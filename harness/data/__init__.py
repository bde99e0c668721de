"""ADE20K data: dataset, recipe transforms, and the `segrepro data` commands.

Bottom of the import graph: nothing here imports the rest of the project but
``harness.config.InputError`` (the base of ``DataError``). The CLI
modules (check, download, synth, bench) each expose ``add_arguments(parser)`` and
``run(args) -> int``.
"""
from .ade20k import (ADE20K, CLASSES, DATASET_DIRNAME, IGNORE_INDEX, NUM_CLASSES, PALETTE, DataError,
                     colorize, dataset_dir, reduce_label)
from .transforms import (RECIPES, build_test_transform, build_train_transform, loader_generator,
                         seed_worker)

__all__ = ["ADE20K", "CLASSES", "DATASET_DIRNAME", "DataError", "IGNORE_INDEX", "NUM_CLASSES", "PALETTE", "RECIPES",
           "build_test_transform", "build_train_transform", "colorize", "dataset_dir",
           "loader_generator", "reduce_label", "seed_worker"]
