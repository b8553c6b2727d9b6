#!/usr/bin/env python3
"""A JobSet manifest that trains on one TPU slice of a GKE cluster, printed or applied.

  python launch/gke_jobset.py --name=polylm-13b --slice=v5p-128 --image=REGISTRY/polylm-jax:TAG \
      --workdir=gs://my-bucket/runs/13b (or --pvc=polylm-runs --workdir=/mnt/runs/13b) \
      --gin_file=runs/polylm_13b.gin --gin_file=my_data.gin [--gin_bindings=...] \
      [--max_restarts=3] [--apply]

One pod per TPU host of the slice (4 chips each), all in one Job of a JobSet: GKE places them on
one node pool of the slice's accelerator and topology, sets the TPU worker variables from which
`jax.distributed.initialize()` finds the coordinator, and on a failure restarts the whole slice
(up to --max_restarts times) — the run then resumes from its newest checkpoint. Each pod runs
`polylm-train --distributed` with the given gin files and workdir: a bucket (gs://, which every
host reaches with the node's service account) or the ReadWriteMany volume --pvc (e.g. Filestore)
mounted at --mount_path, which every host sees.
Any other argument is passed to polylm-train.

The image: launch/Dockerfile (the package with requirements-tpu.txt). Without --apply the
manifest is printed (JSON, which kubectl reads as YAML); with it, piped to `kubectl apply -f -`
($KUBECTL, default kubectl). Needs only the Python standard library.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from polylm_jax import tpu_slices  # noqa: E402 (standard library only)


def manifest(args, train_args: list[str]) -> dict:
  generation, _ = tpu_slices.parse(args.slice)
  hosts = tpu_slices.hosts(args.slice)
  chips_per_host = min(tpu_slices.CHIPS_PER_HOST, tpu_slices.chips(args.slice))
  topology = tpu_slices.topology_name(args.slice).split(":")[1]
  command = ["polylm-train", "--distributed", f"--workdir={args.workdir}", *train_args]
  pod = {
    "restartPolicy": "Never",
    "hostNetwork": True,  # the TPU runtime's inter-host traffic
    "dnsPolicy": "ClusterFirstWithHostNet",
    "nodeSelector": {
      "cloud.google.com/gke-tpu-accelerator": tpu_slices.GKE_ACCELERATOR[generation],
      "cloud.google.com/gke-tpu-topology": topology,
    },
    "containers": [
      {
        "name": "polylm-train",
        "image": args.image,
        "command": command,
        "ports": [{"containerPort": 8471}, {"containerPort": 8080}],
        "securityContext": {"privileged": True},
        "resources": {"limits": {"google.com/tpu": chips_per_host}},
      }
    ],
  }
  if args.pvc:  # a workdir on the shared volume (a gs:// workdir needs none)
    pod["containers"][0]["volumeMounts"] = [{"name": "runs", "mountPath": args.mount_path}]
    pod["volumes"] = [{"name": "runs", "persistentVolumeClaim": {"claimName": args.pvc}}]
  return {
    "apiVersion": "jobset.x-k8s.io/v1alpha2",
    "kind": "JobSet",
    "metadata": {
      "name": args.name,
      # One slice per node pool: the pods of this Job never share a node pool with another's.
      "annotations": {
        "alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"
      },
    },
    "spec": {
      "failurePolicy": {"maxRestarts": args.max_restarts},
      "replicatedJobs": [
        {
          "name": "slice",
          "replicas": 1,
          "template": {
            "spec": {
              "parallelism": hosts,
              "completions": hosts,
              "backoffLimit": 0,  # a failed host fails the slice; the JobSet restarts it whole
              "template": {"spec": pod},
            }
          },
        }
      ],
    },
  }


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
  )
  parser.add_argument("--name", required=True, help="the JobSet's name (a DNS label)")
  parser.add_argument("--slice", required=True, help="e.g. v5p-128, v5e-256, v6e-64")
  parser.add_argument("--image", required=True, help="a container image with polylm-jax")
  parser.add_argument(
    "--pvc", help="ReadWriteMany volume claim for a workdir on a volume (not for gs://)"
  )
  parser.add_argument("--mount_path", default="/mnt/runs")
  parser.add_argument(
    "--workdir", required=True, help="gs://bucket/run, or a path under --mount_path with --pvc"
  )
  parser.add_argument("--max_restarts", type=int, default=3)
  parser.add_argument("--apply", action="store_true", help="kubectl apply it")
  args, train_args = parser.parse_known_args(argv)
  try:
    tpu_slices.parse(args.slice)
  except ValueError as e:
    parser.error(f"--slice={args.slice}: {e}")
  if not any(a.startswith("--gin_file=") for a in train_args):
    parser.error("at least one --gin_file=... is required")
  mount = args.mount_path.rstrip("/") + "/"
  remote = "://" in args.workdir
  if remote and args.pvc:
    parser.error(f"--workdir={args.workdir} is on object storage: --pvc is not used with it")
  if not remote and not args.pvc:
    parser.error(
      f"--workdir={args.workdir} is a path: give the ReadWriteMany volume it is on (--pvc), or "
      "use an object-storage workdir (gs://bucket/run)"
    )
  if not remote and not args.workdir.startswith(mount):
    parser.error(
      f"--workdir={args.workdir} is not under --mount_path={args.mount_path}: every host must "
      "see the workdir, and only the volume is shared"
    )
  text = json.dumps(manifest(args, train_args), indent=2)
  if not args.apply:
    print(text)
    return 0
  kubectl = os.environ.get("KUBECTL", "kubectl")
  return subprocess.run([kubectl, "apply", "-f", "-"], input=text, text=True).returncode


if __name__ == "__main__":
  sys.exit(main())
