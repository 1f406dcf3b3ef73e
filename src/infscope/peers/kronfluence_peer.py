"""kronfluence (Grosse et al., 2023) as a peer: EK-FAC and identity influence on the same LoRA model.

The task's per-example loss is the pipeline's own (mean response-token cross-entropy per row, see
:func:`infscope.grads.losses.default_loss`); the training loss and the measurement are its sum
over the batch, so kronfluence's per-example gradients equal the ones in our gradient store. Only
the LoRA A/B ``nn.Linear`` modules our store holds are tracked. Factors use the empirical Fisher
(true labels, no sampling: deterministic, and the same curvature DataInf approximates).

Sign: kronfluence scores ``g_query^T H^{-1} g_train``, positive for helpful examples; ours is its
negation (higher = more harmful). With ``strategy="identity"`` the result equals minus our
hessian-free (TracIn) score to float32 rounding, which the tests check.
"""

from __future__ import annotations

import tempfile
import warnings
from typing import Any

import numpy as np
import torch

from infscope.peers.inputs import PeerInputs
from infscope.peers.result import PeerUnavailable


def _make_task(modules: list[str]):
    from kronfluence.task import Task

    from infscope.grads.losses import default_loss

    class LoraLossTask(Task):
        """Sum of per-example mean token losses; tracks the given LoRA modules."""

        def compute_train_loss(
            self, batch: Any, model: torch.nn.Module, sample: bool = False
        ) -> torch.Tensor:
            if sample:  # never used: factors are fitted with use_empirical_fisher=True
                raise PeerUnavailable("sampled (true) Fisher is not supported; use the empirical Fisher")
            return default_loss(model, batch).sum()

        def compute_measurement(self, batch: Any, model: torch.nn.Module) -> torch.Tensor:
            return default_loss(model, batch).sum()

        def get_influence_tracked_modules(self) -> list[str]:
            return list(modules)

        def get_attention_mask(self, batch: Any) -> torch.Tensor:
            return batch["attention_mask"]

    return LoraLossTask()


def kronfluence_scores(
    inputs: PeerInputs,
    *,
    strategy: str = "ekfac",
    damping: float | None = None,
    batch_size: int | None = None,
    output_dir: str | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Pairwise kronfluence scores against every validation row, averaged over queries, our sign.

    ``damping=None`` is kronfluence's heuristic (0.1 x mean eigenvalue). Artifacts go to a
    temporary directory unless ``output_dir`` is given.
    """
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.utils.dataset import DataLoaderKwargs

    from infscope.peers.batching import RowDataset, collate_dict

    load = inputs.require_model()
    train_rows = inputs.ordered_train_rows()
    enc_train, enc_val = inputs.encode(train_rows), inputs.encode(inputs.val_rows)
    bs = batch_size or inputs.batch_size
    task = _make_task(inputs.tracked_modules)
    model = prepare_model(load(), task)
    with tempfile.TemporaryDirectory(prefix="kronfluence-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # kronfluence builds a deprecated GradScaler
        analyzer = Analyzer(
            "infscope", model, task, cpu=True, disable_tqdm=True, output_dir=output_dir or tmp
        )
        analyzer.set_dataloader_kwargs(DataLoaderKwargs(collate_fn=collate_dict))
        factor_args = FactorArguments(strategy=strategy, use_empirical_fisher=True)
        analyzer.fit_all_factors(
            strategy,
            RowDataset(enc_train),
            per_device_batch_size=bs,
            factor_args=factor_args,
            overwrite_output_dir=True,
        )
        analyzer.compute_pairwise_scores(
            f"{strategy}_scores",
            strategy,
            RowDataset(enc_val),
            RowDataset(enc_train),
            per_device_query_batch_size=bs,
            per_device_train_batch_size=bs,
            score_args=ScoreArguments(damping_factor=damping),
            overwrite_output_dir=True,
        )
        matrix = analyzer.load_pairwise_scores(f"{strategy}_scores")["all_modules"]
    values = -matrix.double().mean(dim=0).numpy()
    meta = {
        "strategy": strategy,
        "damping": "0.1 x mean eigenvalue" if damping is None else damping,
        "fisher": "empirical",
        "n_query": int(matrix.shape[0]),
        "tracked_modules": len(inputs.tracked_modules),
    }
    return values, meta
