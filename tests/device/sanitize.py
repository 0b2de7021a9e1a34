# Copyright (c) llmfleet maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Replace GPU serial numbers, UUIDs, PDIs and fabric GUIDs in every file under DIR, in place.

The same real value gets the same stand-in in every file (GPU-00000000-0000-0000-0000-00000000000N
in the order nvidia-smi lists the GPUs), so captures stay consistent with each other.
"""

from __future__ import annotations

import os
import re
import sys

UUID = re.compile(r"\b(GPU|MIG)-[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\b")
FIELDS = [
    # (pattern with one group for the value, stand-in prefix)
    (re.compile(r"(?<=<serial>)([^<]*)(?=</serial>)"), "serial"),
    (re.compile(r"(?<=Serial Number)(\s*:\s*)(\S+)"), "serial"),
    (re.compile(r"(?<=<pdi>)([^<]*)(?=</pdi>)"), "pdi"),
    (re.compile(r"(?<=GPU PDI)(\s*:\s*)(\S+)"), "pdi"),
    (re.compile(r"(?<=<gpu_fabric_guid>)([^<]*)(?=</gpu_fabric_guid>)"), "guid"),
    (re.compile(r"(?<=GPU Fabric GUID)(\s*:\s*)(\S+)"), "guid"),
    (re.compile(r"(?<=<chassis_serial_number>)([^<]*)(?=</chassis_serial_number>)"), "serial"),
    (re.compile(r"(?<=<clusterUuid>)([^<]*)(?=</clusterUuid>)"), "guid"),
    (re.compile(r"(?<=ClusterUUID)(\s*:\s*)(\S+)"), "guid"),
]


def files(top):
    found = []
    for base, _dirs, names in os.walk(top):
        for name in names:
            found.append(os.path.join(base, name))
    # The XML first: its GPU order decides the stand-in numbers.
    return sorted(found, key=lambda p: (not p.endswith("q-x.xml"), p))


def main():
    top = sys.argv[1]
    uuids = {}
    others = {}

    def uuid_for(match):
        real = match.group(0)
        if real not in uuids:
            uuids[real] = "%s-00000000-0000-0000-0000-%012d" % (match.group(1), len(uuids) + 1)
        return uuids[real]

    def other_for(kind, real):
        if real in ("N/A", "") or real.startswith("["):
            return real
        key = (kind, real)
        if key not in others:
            number = len([k for k in others if k[0] == kind]) + 1
            others[key] = ("%013d" % number) if kind == "serial" else "0x%016x" % number
        return others[key]

    for path in files(top):
        try:
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
        except (UnicodeDecodeError, OSError):
            continue
        new = UUID.sub(uuid_for, text)
        for pattern, kind in FIELDS:
            if pattern.groups == 1:
                new = pattern.sub(lambda m, k=kind: other_for(k, m.group(1)), new)
            else:
                new = pattern.sub(lambda m, k=kind: m.group(1) + other_for(k, m.group(2)), new)
        if new != text:
            with open(path, "w", encoding="utf-8") as handle:
                handle.write(new)
    print("sanitized %d uuids, %d other identifiers" % (len(uuids), len(others)))


if __name__ == "__main__":
    main()
