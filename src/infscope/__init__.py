"""infscope: find the fine-tuning examples that help or hurt a LoRA-tuned language model.

The package is a library first; the ``infscope`` command is a thin layer over it.
Stages, in the order data flows: ``data`` -> ``noise`` -> ``models`` -> ``grads`` ->
``estimators`` -> ``evaluate``; ``pipeline`` wires them over a run directory.
"""

__version__ = "0.1.0"
