"""Peers by name and the one entry point, :func:`run_peer`, that never raises for a failing peer."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from infscope.errors import InfscopeError
from infscope.peers.inputs import PeerInputs
from infscope.peers.result import PeerResult, guarded


@dataclass(frozen=True)
class Peer:
    """One peer: the package it needs (``None``: ours), our method it is compared with, its scorer."""

    name: str
    package: str | None
    ours: tuple[str, ...]
    compute: Callable[..., tuple[np.ndarray, dict[str, Any]]]
    help: str


def _reference(inputs: PeerInputs, **kw: Any) -> tuple[np.ndarray, dict[str, Any]]:
    from infscope.peers.reference import reference_datainf

    return reference_datainf(inputs.train_grads, inputs.val_grads, **kw), {"loop": "per row, float64"}


def _kron(strategy: str) -> Callable[..., tuple[np.ndarray, dict[str, Any]]]:
    def compute(inputs: PeerInputs, **kw: Any) -> tuple[np.ndarray, dict[str, Any]]:
        from infscope.peers.kronfluence_peer import kronfluence_scores

        return kronfluence_scores(inputs, strategy=strategy, **kw)

    return compute


def _dattri_tracin(inputs: PeerInputs, **kw: Any) -> tuple[np.ndarray, dict[str, Any]]:
    from infscope.peers.dattri_peer import dattri_tracin_scores

    return dattri_tracin_scores(inputs, **kw)


def _dattri_datainf(inputs: PeerInputs, **kw: Any) -> tuple[np.ndarray, dict[str, Any]]:
    from infscope.peers.dattri_peer import dattri_datainf_scores

    return dattri_datainf_scores(inputs, **kw)


def _dattri_trak(inputs: PeerInputs, **kw: Any) -> tuple[np.ndarray, dict[str, Any]]:
    from infscope.peers.dattri_peer import dattri_trak_scores

    return dattri_trak_scores(inputs, **kw)


def _cleanlab(inputs: PeerInputs, **kw: Any) -> tuple[np.ndarray, dict[str, Any]]:
    from infscope.peers.cleanlab_peer import cleanlab_scores

    return cleanlab_scores(inputs, **kw)


PEERS: dict[str, Peer] = {
    p.name: p
    for p in (
        Peer("reference_datainf", None, ("datainf",), _reference, "DataInf formula as a plain per-row loop"),
        Peer("kronfluence_ekfac", "kronfluence", ("exact", "datainf"), _kron("ekfac"), "kronfluence EK-FAC"),
        Peer(
            "kronfluence_identity",
            "kronfluence",
            ("hessian_free",),
            _kron("identity"),
            "kronfluence with H = I (gradient dot products)",
        ),
        Peer("dattri_tracin", "dattri", ("hessian_free",), _dattri_tracin, "dattri TracIn (projected)"),
        Peer("dattri_datainf", "dattri", ("datainf",), _dattri_datainf, "dattri DataInf attributor"),
        Peer(
            "dattri_trak",
            "dattri",
            ("hessian_free",),
            _dattri_trak,
            "dattri TRAK (projected, one checkpoint)",
        ),
        Peer("cleanlab", "cleanlab", ("loss",), _cleanlab, "cleanlab label quality (classification only)"),
    )
}


def is_installed(package: str | None) -> bool:
    """True when ``package`` can be imported (``None`` = our own code, always there)."""
    return package is None or importlib.util.find_spec(package) is not None


def available_peers() -> list[str]:
    """Peers whose package is installed here."""
    return [name for name, peer in PEERS.items() if is_installed(peer.package)]


def run_peer(name: str, source: str | Path | PeerInputs, **options: Any) -> PeerResult:
    """Score the training rows of a run with peer ``name``, in our sign convention.

    ``source`` is a run directory or :class:`PeerInputs` (read a run once with
    :meth:`PeerInputs.from_run` when running several peers). ``options`` go to the peer's scorer
    (e.g. ``damping=``, ``proj_dim=``, ``batch_size=``). An unknown name or unreadable run raises
    :class:`InfscopeError`; anything that goes wrong inside the peer (not installed, not
    applicable, crash, out of memory) comes back as ``PeerResult.error``.
    """
    if name not in PEERS:
        raise InfscopeError(f"unknown peer {name!r}; choose one of {', '.join(PEERS)}")
    peer = PEERS[name]
    inputs = source if isinstance(source, PeerInputs) else PeerInputs.from_run(source)
    if not is_installed(peer.package):
        return PeerResult(
            name, None, 0.0, 0.0, f"not installed: pip install {peer.package}", inputs.train_ids
        )
    return guarded(name, inputs.train_ids, lambda: peer.compute(inputs, **options))
