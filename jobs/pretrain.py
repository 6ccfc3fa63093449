"""`ray job submit --working-dir . -- python jobs/pretrain.py --config configs/imdb-itpt-1gpu.yaml --output-dir s3://BUCKET/run` entrypoint (outputs on storage every node shares)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo, for --working-dir

from bertjob.cli import main  # noqa: E402

sys.exit(main(["pretrain", *sys.argv[1:]]))
