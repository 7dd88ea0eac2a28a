"""Run `pretune ARGS` under torchrun with the loss of rank 1 turned NaN after a few micro-batches
(a test helper for tests/test_dist.py)."""

import os
import sys

from pretune.train import objectives

_original = objectives.LMObjective.__call__
_calls = {"n": 0}


def _nan_on_rank_one(self, model, batch):
    loss = _original(self, model, batch)
    _calls["n"] += 1
    if os.environ.get("RANK") == "1" and _calls["n"] > 6:
        return loss * float("nan")
    return loss


objectives.LMObjective.__call__ = _nan_on_rank_one

if __name__ == "__main__":
    from pretune.cli import main

    sys.exit(main(sys.argv[1:]))
