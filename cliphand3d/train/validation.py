"""What a training run validates on: its `val` split, or with data=mix each set's `val` on its own.

Each set of a mix is scored with its own protocol (a FreiHAND set with FreiHAND's metrics, RHD with hand3d's:
evaluation/scoring.validate, as eval.py scores it), never pooled; its metrics are named `<set>/<metric>` (logged
as val/<set>/<metric>). best.pt follows trainer.monitor on one stated set (data.monitor_set; null: the first
that validates), and the run's log says which. One dataset keeps its metrics' plain names.
"""
from __future__ import annotations

from collections.abc import Callable

from ..evaluation.sharding import shard_positions


class Validation:
    """The val set(s) of a run and their loaders: with several processes, each rank's loader covers its share of
    whole batches (evaluation/sharding.py). `loader(dataset, batch_size, **kw)` makes a loader (Run._loader)."""

    def __init__(self, val_set, *, monitor_set: str | None, loader: Callable, batch_size: int, rank: int = 0,
                 world: int = 1):
        mixed = getattr(val_set, "sets", None)
        self.mixed = mixed is not None
        self.sets = dict(mixed) if self.mixed else {"": val_set}
        self.monitor_set = (monitor_set or next(iter(self.sets))) if self.mixed else ""
        if self.monitor_set not in self.sets:
            # build.monitor_set has told the user already: this is a caller's mistake
            raise ValueError(f"Validation: monitor_set={monitor_set!r} is not one of the val sets {list(self.sets)}")
        bs = int(batch_size)
        self.loaders = {name: loader(ds, bs) if world == 1 else
                        loader(ds, bs, sampler=shard_positions(len(ds), bs, rank, world))
                        for name, ds in self.sets.items()}

    def key(self, name: str, metric: str) -> str:
        return f"{name}/{metric}" if name else metric

    def monitor_key(self, monitor: str) -> str:
        """The metric key best.pt follows: trainer.monitor, of the monitor set where there are several."""
        return self.key(self.monitor_set, monitor)

    def describe(self, monitor: str) -> str:
        """One line for the run's log: which set and metric choose best.pt, and each set's protocol."""
        protocols = ", ".join(f"{n} ({getattr(ds, 'protocol', 'freihand')} protocol, {len(ds)} samples)"
                              for n, ds in self.sets.items())
        return (f"data=mix: every set validates on its own, metrics val/<set>/<metric>: {protocols}; best.pt is "
                f"chosen on trainer.monitor={monitor} of data.monitor_set={self.monitor_set} "
                f"(val/{self.monitor_key(monitor)})")

    def run(self, model, device, score: Callable, text_branch=None) -> tuple[dict, dict]:
        """(metrics of every set, named by `key`; {set name: its predictions}, rank 0's, {} each elsewhere), each
        set scored by `score` (evaluation/scoring.validate, as train/run.py names it). Every rank calls it, the
        sets in the same order (each validation is a collective)."""
        res, predictions = {}, {}
        for name, ds in self.sets.items():
            metrics, predictions[name] = score(model, self.loaders[name], device, getattr(ds, "protocol", "freihand"),
                                               text_branch=text_branch)
            res.update({self.key(name, k): v for k, v in metrics.items()})
        return res, predictions
