"""Build the small IMDb sample shipped in the package (bertjob/data/aclImdb_sample.tar.gz).

    python scripts/make_imdb_sample.py ../shared/data/aclImdb_v1.tar.gz

Deterministic: the same archive always gives the same sample (selection by a hash of the path).
Balanced: 1,000 pos + 1,000 neg train, 500 + 500 test, and 500 unlabelled reviews.
"""

from __future__ import annotations

import hashlib
import io
import sys
import tarfile
from pathlib import Path

from bertjob.sources import IMDB_FILE, SAMPLE_NAME

COUNTS = {
    ("train", "pos"): 1000,
    ("train", "neg"): 1000,
    ("test", "pos"): 500,
    ("test", "neg"): 500,
    ("train", "unsup"): 500,
}


def main(src: str, dst: str) -> None:
    members: dict[tuple[str, str], list[tuple[str, bytes]]] = {k: [] for k in COUNTS}
    with tarfile.open(src, "r|*") as tf:
        for m in tf:
            match = IMDB_FILE.search(m.name) if m.isfile() else None
            if match and (match.group(1), match.group(2)) in COUNTS:
                members[(match.group(1), match.group(2))].append((m.name, tf.extractfile(m).read()))
    with tarfile.open(dst, "w:gz", format=tarfile.PAX_FORMAT) as out:
        for key, want in COUNTS.items():
            chosen = sorted(members[key], key=lambda nb: hashlib.sha256(nb[0].encode()).hexdigest())[:want]
            for name, data in sorted(chosen):
                info = tarfile.TarInfo(name[name.index("aclImdb/") :])
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                out.addfile(info, io.BytesIO(data))
    print(f"wrote {dst} ({Path(dst).stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main(
        sys.argv[1],
        sys.argv[2]
        if len(sys.argv) > 2
        else str(Path(__file__).parents[1] / "bertjob" / "data" / SAMPLE_NAME),
    )
