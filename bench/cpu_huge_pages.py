"""Train steps on the CPU with and without glibc's huge-page tunable (what launch/env.sh sets).

XLA allocates a step's temporaries afresh every step; glibc maps allocations over 32 MiB anew, and
the kernel faults them in page by page. `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` asks for
transparent huge pages for those mappings. The tunable is read when a process starts, so each
setting runs in a child process (same steps, same batch, compilation cache off); prints each one's
step time, page faults, system CPU time and peak memory, and the ratio of step times.

  python bench/cpu_huge_pages.py [--preset tiny] [--batch 16] [--seq 128] [--steps 100]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
BENCH = os.path.dirname(os.path.abspath(__file__))

CHILD = r"""
import json, resource, sys
sys.path.insert(0, sys.argv[1])
from train_step_cpu import jax_steps
from polylm_jax.config import PRESETS

preset, batch, seq, steps = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
tokens_per_s, loss = jax_steps(PRESETS[preset].replace(dtype="float32"), batch, seq, steps, 3)
peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # this process's own
print(json.dumps({"step_s": batch * seq / tokens_per_s, "loss": loss, "max_rss_gib": peak_gib}))
"""


def run(tunables: str | None, args) -> dict:
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "XLA_FLAGS")}
  env.update(JAX_PLATFORMS="cpu", JAX_ENABLE_COMPILATION_CACHE="false")
  if tunables:
    env["GLIBC_TUNABLES"] = tunables
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  shape = map(str, (args.batch, args.seq, args.steps))
  out = subprocess.run(
    [sys.executable, "-c", CHILD, BENCH, args.preset, *shape],
    env=env,
    capture_output=True,
    text=True,
    check=True,
  )
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  result = json.loads(out.stdout.strip().splitlines()[-1])
  result["faults"] = after.ru_minflt - before.ru_minflt
  result["sys_s"] = after.ru_stime - before.ru_stime
  return result


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--preset", default="tiny")
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--seq", type=int, default=128)
  parser.add_argument("--steps", type=int, default=100)
  args = parser.parse_args()
  thp = "/sys/kernel/mm/transparent_hugepage/enabled"
  mode = open(thp).read().strip() if os.path.exists(thp) else "unknown"
  print(f"machine: {platform.machine()} {os.cpu_count()} cores; {platform.libc_ver()}; THP {mode}")
  print(f"{args.preset} float32, batch {args.batch} x {args.seq}, {args.steps} timed steps")
  plain = run(None, args)
  huge = run(TUNABLE, args)
  for name, r in (("default malloc", plain), (TUNABLE, huge)):
    print(
      f"{name:24s}: {r['step_s'] * 1e3:7.1f} ms/step  {r['faults']:>9d} page faults  "
      f"{r['sys_s']:6.1f} s system  peak {r['max_rss_gib']:.2f} GiB  loss {r['loss']:.6f}"
    )
  print(f"step time ratio default/huge pages: {plain['step_s'] / huge['step_s']:.2f}x")


if __name__ == "__main__":
  main()
