"""Facts about the host: RAM, CPU cores, this process's resident memory, a Mac's chip and macOS version.
Imports nothing of ddpmctl (nor torch).

Linux reads /proc; macOS asks ``vm_stat`` and ``sysctl``; where a figure cannot be read it is None.
"""

from __future__ import annotations

import os
import platform
import re
import resource
import subprocess
import sys


def command_output(cmd: list[str]) -> str | None:
    """What ``cmd`` prints (stripped), or None if it cannot run."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def meminfo_bytes(key: str) -> int | None:
    """A field of /proc/meminfo in bytes (Linux), or None."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def available_ram() -> int | None:
    """RAM a new allocation can get without swapping: MemAvailable on Linux, free+inactive pages on macOS."""
    value = meminfo_bytes("MemAvailable")
    if value is not None or sys.platform != "darwin":
        return value
    out = command_output(["vm_stat"]) or ""
    page = re.search(r"page size of (\d+)", out)
    pages = [int(m.group(1)) for m in re.finditer(r"Pages (?:free|inactive|speculative):\s+(\d+)", out)]
    return sum(pages) * int(page.group(1)) if page and pages else None


def total_ram() -> int | None:
    """Installed RAM in bytes."""
    value = meminfo_bytes("MemTotal")
    if value is None and sys.platform == "darwin":
        out = command_output(["sysctl", "-n", "hw.memsize"])
        value = int(out) if out and out.isdigit() else None
    return value


def cpu_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def status_bytes(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM) in bytes, or None."""
    try:
        with open("/proc/self/status") as fh:
            m = re.search(rf"^{field}:\s+(\d+) kB", fh.read(), re.MULTILINE)
        return int(m.group(1)) * 1024 if m else None
    except OSError:
        return None


def peak_rss() -> int:
    """Peak resident set size of this process: VmHWM (resettable on Linux), else ru_maxrss."""
    hwm = status_bytes("VmHWM")
    if hwm is not None:
        return hwm
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024  # bytes on macOS, KiB on Linux


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where the peak cannot be reset."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def mac_chip() -> str | None:
    """The Mac's chip as macOS names it (``sysctl machdep.cpu.brand_string``, e.g. "Apple M2 Pro"); None elsewhere."""
    if sys.platform != "darwin":
        return None
    return command_output(["sysctl", "-n", "machdep.cpu.brand_string"]) or None


def macos_version() -> str | None:
    """The macOS version (e.g. "14.5"); None elsewhere."""
    if sys.platform != "darwin":
        return None
    return platform.mac_ver()[0] or None


def apple_generation(chip: str | None) -> int | None:
    """The M generation of an Apple Silicon chip name ("Apple M3 Max" -> 3); None for anything else."""
    found = re.match(r"Apple M(\d+)", chip or "")
    return int(found.group(1)) if found else None


def macos_major(version: str | None) -> int | None:
    """The major version of a macOS version string ("13.6.1" -> 13); None if there is none."""
    found = re.match(r"(\d+)", version or "")
    return int(found.group(1)) if found else None
