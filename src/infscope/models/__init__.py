"""Models: load a base model (built-ins work offline), attach LoRA, encode rows, losses, fine-tuning.

Modules, in the order they build on each other:

* :mod:`~infscope.models.registry` -- :func:`load_model` by built-in name, local path or Hub name;
* :mod:`~infscope.models.builtin`, :mod:`~infscope.models.tiny`, :mod:`~infscope.models.cache` --
  the built-in models and the cache they are converted or built into;
* :mod:`~infscope.models.encode` -- rows to token ids and loss targets, padded batches;
* :mod:`~infscope.models.loss` -- the one per-example loss definition, and losses for many rows;
* :mod:`~infscope.models.lora` -- attach / reload LoRA adapters, names of the LoRA layers;
* :mod:`~infscope.models.finetune` -- the seeded fine-tuning loop with per-epoch checkpoints.

Submodules are imported on use, so ``import infscope.models`` stays cheap.
"""
