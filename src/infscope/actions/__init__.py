"""Act on scored training rows, retrain, and keep what helps: the cleaning loop behind ``infscope clean``.

One module per job:

* :mod:`~infscope.actions.flagging`: the budget (``k`` rows, a fraction, or a score threshold) and
  which rows are flagged (the most harmful first; higher score = more harmful).
* :mod:`~infscope.actions.changes`: one :class:`~infscope.actions.changes.Change` per edited row
  (round, id, action, before, after, score, method, reason) and how changes are applied to rows.
* :mod:`~infscope.actions.drop`, :mod:`~infscope.actions.reweight`, :mod:`~infscope.actions.relabel`,
  :mod:`~infscope.actions.repair`: the four actions, pure functions of rows and scores (relabel
  reads class losses, repair an expert and a re-scoring function, both given by the caller).
* :mod:`~infscope.actions.experts`: repair experts (a local model or an OpenAI-compatible endpoint).
* :mod:`~infscope.actions.metrics`: test-set metrics of a tuned model (loss, accuracy, exact match
  of the final number by greedy generation).
* :mod:`~infscope.actions.output`: the cleaned rows written in the input's own format.
* :mod:`~infscope.actions.audit`: the audit log and ``--undo``, which restores the input bytes.
* :mod:`~infscope.actions.layout`: where each artifact of a cleaning directory lives.
* :mod:`~infscope.actions.loop`: rounds of fine-tune, score, act, evaluate; baselines (no cleaning,
  random rows, the injected noise itself) in the same run; resumable round by round.
"""
