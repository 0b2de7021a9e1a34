# Copyright (c) llmfleet maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Copy the sysfs attributes gpu_info reads for NVIDIA PCI devices into DEST, as a fake tree.

Usage: sysfs_snapshot.py DEST [SYSFS_ROOT]. The driver symlink is kept as a one-line file
``driver_name`` and PCI addresses are written with ``_`` for ``:`` (the unit test undoes both).
"""

from __future__ import annotations

import os
import sys

ATTRS = ("vendor", "device", "class", "subsystem_vendor", "subsystem_device", "numa_node",
         "local_cpulist", "current_link_speed", "current_link_width", "max_link_speed",
         "max_link_width")


def main():
    dest = sys.argv[1]
    root = sys.argv[2] if len(sys.argv) > 2 else "/sys"
    base = os.path.join(root, "bus", "pci", "devices")
    for entry in sorted(os.listdir(base)):
        path = os.path.join(base, entry)
        try:
            with open(os.path.join(path, "vendor")) as handle:
                if handle.read().strip().lower() != "0x10de":
                    continue
        except OSError:
            continue
        # ":" is kept out of file names in the repository; the tests put it back.
        target = os.path.join(dest, "bus", "pci", "devices", entry.replace(":", "_"))
        os.makedirs(target, exist_ok=True)
        for attr in ATTRS:
            try:
                with open(os.path.join(path, attr)) as handle:
                    value = handle.read()
            except OSError:
                continue
            with open(os.path.join(target, attr), "w") as handle:
                handle.write(value)
        driver = os.path.join(path, "driver")
        if os.path.islink(driver):
            with open(os.path.join(target, "driver_name"), "w") as handle:
                handle.write(os.path.basename(os.readlink(driver)) + "\n")


if __name__ == "__main__":
    main()
