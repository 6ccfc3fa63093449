"""Extract the openAPIV3Schema of KubeRay's v1 CRDs into the small JSON files the manifest tests use.

    python tests/data/k8s/extract_kuberay_schemas.py ../shared/kuberay-crds

reads ray.io_rayclusters.yaml and ray.io_rayjobs.yaml from that folder (the CRDs of the KubeRay operator,
helm-chart/kuberay-operator/crds/, Apache License 2.0 -- see LICENSE.kuberay beside this file) and writes
rayclusters.ray.io-v1.schema.json and rayjobs.ray.io-v1.schema.json here. Rerun it when the CRDs are
updated, and update SOURCE_COMMIT below and README.md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

# ray-project/kuberay master of 2026-08-19; its CRDs are the same as release v1.7.0.
SOURCE_COMMIT = "feeaf72facab4881ba2b179248bb67315634e229"
CRDS = {"ray.io_rayclusters.yaml": "rayclusters.ray.io-v1", "ray.io_rayjobs.yaml": "rayjobs.ray.io-v1"}


def extract(crd_path: Path, version: str = "v1") -> dict:
    crd = yaml.load(crd_path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (schema,) = [v["schema"]["openAPIV3Schema"] for v in crd["spec"]["versions"] if v["name"] == version]
    comment = (
        f"openAPIV3Schema of {crd['spec']['names']['kind']} {crd['spec']['group']}/{version}, from "
        f"ray-project/kuberay helm-chart/kuberay-operator/crds/{crd_path.name} at commit {SOURCE_COMMIT}. "
        "Licensed under the Apache License 2.0 (LICENSE.kuberay)."
    )
    return {"$comment": comment, **schema}


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    src, here = Path(argv[1]), Path(__file__).resolve().parent
    for crd_file, stem in CRDS.items():
        schema = extract(src / crd_file)
        # Compact and key-sorted: small, and a regeneration from the same CRDs gives the same bytes.
        (here / f"{stem}.schema.json").write_text(
            json.dumps(schema, separators=(",", ":"), sort_keys=True) + "\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
