"""Trainer integrations, each an optional extra imported only when used:

* :mod:`sparta.integrations.transformers`: ``SpartaCallback`` for ``transformers.Trainer``
  (``pip install 'sparta[hf]'``);
* :mod:`sparta.integrations.lightning`: ``SpartaCallback`` for Lightning
  (``pip install 'sparta[lightning]'``).

Both drive :class:`~sparta.integrations.core.PruningDriver`, which wraps the model, makes the
pruner (``sparta.make_pruner``), steps it on the schedule, adds its penalty, measures and exports.
Importing this package imports neither framework.
"""
