"""Peak memory of streamed DataInf against the store-based path, on 1,000, 5,000 and 20,000 rows.

Each (path, rows) runs in its own child process so that its peak RSS (``ru_maxrss``) is its own.
The rows are real text: the ``debian_describe`` built-in (apt's package descriptions) when this
machine has apt lists, else ``sentence_transform``; they are encoded once by the parent and saved
as padded int32 arrays, so the children load only token ids (``n x seq_len`` integers, a few MB).
The model is the tiny-llama built-in with LoRA r=8 on q,v; the query vector is the mean gradient
of the test rows.

- ``streaming``: :func:`infscope.grads.streaming.stream_scores` with ``methods=("datainf",)``
  (three gradient passes, no gradient kept);
- ``store``: :func:`infscope.grads.collect_to_store` (float32) then DataInf fit and score on it.

The table shows the peak RSS *while scoring* (sampled every 20 ms by :class:`infscope.runs.PeakMemory`),
the RSS before scoring (model and data loaded) and the increment, the store size, the seconds, and
the whole process's ``ru_maxrss`` (which a start-up transient of loading the model can dominate).
Streamed peak RSS should stay within 10 % across row counts.

    OMP_NUM_THREADS=1 python3 benchmarks/streaming_memory.py --rows 1000,5000,20000
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from infscope.errors import InfscopeError
from infscope.runs import PeakMemory

SEQ_LEN = 48


def rss_mb() -> float:
    """Current resident set size in MiB (from /proc/self/statm)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 2**20


def peak_mb() -> float:
    """Peak resident set size of this process in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_data(rows: int, out: Path) -> str:
    """Encode ``rows`` train rows and the test rows to padded int32 arrays in ``out``; return the source."""
    from infscope.data.builtin import make_builtin
    from infscope.models.encode import encode_rows
    from infscope.models.registry import load_model

    per_class = math.ceil(rows / 12) + 2
    try:
        split = make_builtin("debian_describe", n_classes=12, per_class=per_class, n_test_per_class=2)
        source = "debian_describe"
    except InfscopeError:
        split = make_builtin(
            "sentence_transform", n_classes=10, per_class=math.ceil(rows / 10) + 2, n_test_per_class=2
        )
        source = "sentence_transform"
    if len(split.train) < rows:
        raise SystemExit(f"{source} gave {len(split.train)} rows, fewer than {rows}")
    tokenizer = load_model("tiny-llama").tokenizer
    for name, part in (("train", split.train[:rows]), ("query", split.test)):
        enc = encode_rows(part, tokenizer, task="causal", max_length=SEQ_LEN)
        ids = np.zeros((len(enc), SEQ_LEN), dtype=np.int32)
        labels = np.full((len(enc), SEQ_LEN), -100, dtype=np.int32)
        mask = np.zeros((len(enc), SEQ_LEN), dtype=np.int8)
        for i, (toks, labs) in enumerate(zip(enc.input_ids, enc.labels, strict=True)):
            ids[i, : len(toks)], labels[i, : len(labs)], mask[i, : len(toks)] = toks, labs, 1
        np.savez(out / f"{name}.npz", input_ids=ids, labels=labels, attention_mask=mask)
    return source


def load_data(path: Path, rows: int | None = None) -> dict[str, torch.Tensor]:
    """The first ``rows`` encoded rows as int64 tensors (what the gradient pass consumes)."""
    with np.load(path) as data:
        return {k: torch.from_numpy(data[k][:rows].astype(np.int64)) for k in data.files}


def child(kind: str, rows: int, data_dir: Path, batch_size: int) -> dict:
    """Score ``rows`` rows with ``kind`` ('streaming' or 'store'); report memory and time."""
    from infscope.estimators.datainf import DataInf
    from infscope.grads import collect_to_store, compute_gradients
    from infscope.grads.streaming import stream_scores
    from infscope.models.config import LoraSpec
    from infscope.models.lora import attach_lora
    from infscope.models.registry import load_model

    torch.set_num_threads(1)
    model = attach_lora(load_model("tiny-llama", seed=0), LoraSpec(r=8, target_modules=["q_proj", "v_proj"]))
    train = load_data(data_dir / "train.npz", rows)
    query = compute_gradients(model, load_data(data_dir / "query.npz"), batch_size=batch_size, progress=False)
    v = {name: query.load_block(name).mean(dim=0) for name in query.block_names}
    before = rss_mb()
    start = time.perf_counter()
    store_mb = 0.0
    with PeakMemory(interval=0.02) as stage:
        if kind == "streaming":
            scores = stream_scores(model, train, v, batch_size=batch_size, methods=("datainf",))["datainf"]
        else:
            with tempfile.TemporaryDirectory() as tmp:
                store = collect_to_store(
                    model, train, Path(tmp) / "store", batch_size=batch_size, progress=False
                )
                store_mb = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file()) / 2**20
                scores = DataInf().fit(store).score(query).values
    return {
        "kind": kind,
        "rows": rows,
        "process_peak_mb": peak_mb(),
        "peak_mb": stage.peak_rss / 2**20,
        "before_mb": before,
        "store_mb": store_mb,
        "seconds": time.perf_counter() - start,
        "checksum": float(np.abs(scores).sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1000,5000,20000", help="Comma-separated row counts.")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--paths", default="streaming,store", help="Which paths to run.")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    counts = [int(x) for x in args.rows.split(",")]
    if args.child:
        print(json.dumps(child(args.child, counts[0], Path(args.data), args.batch_size)))
        return
    data_dir = Path(tempfile.mkdtemp(prefix="infscope-stream-bench-"))
    try:
        source = make_data(max(counts), data_dir)
        results = []
        for rows in counts:
            for kind in args.paths.split(","):
                cmd = [
                    sys.executable,
                    __file__,
                    "--child",
                    kind,
                    "--rows",
                    str(rows),
                    "--data",
                    str(data_dir),
                ]
                cmd += ["--batch-size", str(args.batch_size)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                results.append(json.loads(out.strip().splitlines()[-1]))
                print(f"done {kind} {rows}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    print(f"rows: {source}, tiny-llama LoRA r=8 q,v, seq_len {SEQ_LEN}, batch {args.batch_size}, DataInf")
    print(
        f"{'path':<10} {'rows':>7} {'peak RSS':>10} {'before':>9} {'increment':>10} {'store':>10} {'seconds':>9}"
    )
    for r in results:
        store = f"{r['store_mb']:.1f} MiB" if r["store_mb"] else "-"
        print(
            f"{r['kind']:<10} {r['rows']:>7} {r['peak_mb']:>6.0f} MiB {r['before_mb']:>5.0f} MiB "
            f"{r['peak_mb'] - r['before_mb']:>6.0f} MiB {store:>10} {r['seconds']:>9.1f} "
            f"{r['process_peak_mb']:>9.0f} MiB"
        )
    streamed = [r["peak_mb"] for r in results if r["kind"] == "streaming"]
    if streamed:
        spread = (max(streamed) - min(streamed)) / min(streamed)
        verdict = "within" if spread <= 0.10 else "NOT within"
        print(f"streamed peak RSS spread: {100 * spread:.1f} % ({verdict} 10 %)")


if __name__ == "__main__":
    main()
