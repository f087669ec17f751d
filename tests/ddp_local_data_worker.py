"""torchrun's worker for the tests in tests/test_train_layerwise.py where ranks see different files:
lwt.train_layerwise run from <LWT_NODES>/node<RANK>, so that a relative data.path or cache_dir is that rank's
own (as each node of a job may read its own copy of the corpus, or cache on its own local scratch)."""
import os
import sys

os.chdir(os.path.join(os.environ["LWT_NODES"], f"node{os.environ['RANK']}"))

from lwt import train_layerwise as T  # noqa: E402

try:
    sys.exit(T.main(sys.argv[1:]))
except ValueError as e:  # as lwt.train_layerwise's __main__
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
