"""torchrun's worker for tests/test_train_layerwise.py::test_two_process_ddp: lwt.train_layerwise whose
rank 1 alone receives a SIGTERM during its third optimizer step of this invocation (as a rank of a
preempted job may get it before the others), so that the ranks must agree to stop."""
import os
import signal
import sys

from lwt import train_layerwise as T

calls, loss = [], T.Trainer.loss


def loss_then_term(self, *args):
    calls.append(1)
    if self.env.rank == 1 and len(calls) == 3:
        os.kill(os.getpid(), signal.SIGTERM)
    return loss(self, *args)


T.Trainer.loss = loss_then_term
sys.exit(T.main(sys.argv[1:]))
