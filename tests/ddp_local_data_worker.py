"""torchrun's worker for tests/test_train_layerwise.py::test_resume_refuses_one_nodes_changed_data_on_every_rank:
lwt.train_layerwise run from <LWT_NODES>/node<RANK>, so that a relative data.path reads that rank's own
copy of the corpus (as each node of a job may read its own copy, on local scratch)."""
import os
import sys

os.chdir(os.path.join(os.environ["LWT_NODES"], f"node{os.environ['RANK']}"))

from lwt import train_layerwise as T  # noqa: E402

try:
    sys.exit(T.main(sys.argv[1:]))
except ValueError as e:  # as lwt.train_layerwise's __main__
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
