"""Peak resident memory of this process, resettable (Linux): VmHWM from /proc/self/status, reset by
writing 5 to /proc/self/clear_refs. (getrusage's ru_maxrss is no good here: it survives fork+exec,
so a child would report its parent's peak.)"""


def reset_peak() -> None:
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")


def peak_gib() -> float:
  return _status_kib("VmHWM") / 2**20


def current_gib() -> float:
  return _status_kib("VmRSS") / 2**20


def _status_kib(field: str) -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  raise RuntimeError(f"{field} not in /proc/self/status")
