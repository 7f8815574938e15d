"""What a DNAS search writes into its run folder while it runs: theta.jsonl and metrics.jsonl
(each log entry) and supernet.pt (what --resume continues). The process that searches writes
them: this one with one worker, rank 0 with several (so the folder must be one it can reach:
on a cluster of several machines, a shared filesystem, as Ray Train's storage is)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class DnasOutput:
    folder: Path
    space: Any             # nas.spaces.SearchSpace
    seed: int
    factored: bool
    target: dict | None    # Target.__dict__
    latency: dict | None

    def log(self, entry: dict[str, Any]) -> None:
        from nas.runs import append_jsonl

        append_jsonl(self.folder / "theta.jsonl", entry)
        append_jsonl(self.folder / "metrics.jsonl", {k: v for k, v in entry.items()
                                                     if k != "probs"})

    def save(self, supernet, state, optimizers: dict) -> None:
        """supernet.pt, rewritten whole (atomically) at each save."""
        import torch

        from nas.clock import now_iso
        from nas.runs import save_checkpoint
        from nas.search.supernet_file import supernet_payload

        payload = supernet_payload(
            self.space, supernet, seed=self.seed, factored=self.factored, created=now_iso(),
            optimizers=optimizers,
            search_state={"step": state.step, "elapsed": state.elapsed, "history": []},
            target=self.target, latency=self.latency)
        payload["rng"] = torch.get_rng_state()
        save_checkpoint(self.folder / "supernet.pt", payload)
