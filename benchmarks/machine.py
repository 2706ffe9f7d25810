"""One line naming the machine a benchmark ran on, for the header of its output."""

from __future__ import annotations

import platform

import torch


def describe(device: torch.device | None = None) -> str:
    """The GPU's name on CUDA, else the CPU's model name (platform.processor() only says 'x86_64')."""
    if device is not None and device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # not Linux
        pass
    return platform.processor() or platform.machine()
