"""Peers side by side: other projects' influence and data-quality methods on the same run.

``run_peer(name, run_dir_or_inputs)`` returns a :class:`PeerResult` (scores in our sign: higher =
more harmful, seconds, peak memory, or an error line). Peers: ``reference_datainf`` (the DataInf
formula as a plain loop, ours), ``kronfluence_ekfac``, ``kronfluence_identity``, ``dattri_tracin``,
``dattri_datainf``, ``dattri_trak``, ``cleanlab`` (classification runs). The third-party packages
are optional (the ``peers`` extra); a missing one gives an error row, never an exception.
"""

from infscope.peers.agreement import compare_peers
from infscope.peers.inputs import PeerInputs
from infscope.peers.registry import PEERS, available_peers, run_peer
from infscope.peers.result import PeerResult

__all__ = ["PEERS", "PeerInputs", "PeerResult", "available_peers", "compare_peers", "run_peer"]
