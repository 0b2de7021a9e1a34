# Copyright (c) llmfleet maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Record every NVML call that collect_nvml makes, with its answer, as JSON.

Run on a GPU host (tests/device/run.sh). The unit tests replay the recording through a fake
pynvml (tests/unit/plugins/module_utils/test__gpu.py), so the NVML path is tested against what
a real driver answered. Handles become tokens ("h0", "h1", ...), ctypes structures dicts.
"""

from __future__ import annotations

import ctypes
import json
import sys
import time

import pynvml

from ansible_collections.llmfleet.serving.plugins.module_utils._gpu import collect_nvml


class Recorder(object):
    def __init__(self, real):
        self._real = real
        self._tokens = {}
        self.calls = []
        for name in dir(real):
            if name.startswith(("NVML_", "nvmlMemory_v")) or name == "NVMLError":
                setattr(self, name, getattr(real, name))

    def _token(self, handle):
        key = ctypes.cast(handle, ctypes.c_void_p).value
        if key not in self._tokens:
            self._tokens[key] = "h%d" % len(self._tokens)
        return self._tokens[key]

    def _plain(self, value):
        if isinstance(value, bytes):
            return value.decode("utf-8", "replace")
        if isinstance(value, ctypes.Structure):
            return dict((f[0], self._plain(getattr(value, f[0]))) for f in value._fields_
                        if not f[0].startswith("reserved") or f[0] == "reserved")
        if isinstance(value, (list, tuple)):
            return [self._plain(v) for v in value]
        if isinstance(value, (int, float, str)) or value is None:
            return value
        if isinstance(value, ctypes.Array):
            return [self._plain(v) for v in value]
        if hasattr(value, "contents") or type(value).__name__.startswith("LP_"):
            return {"handle": self._token(value)}
        return repr(value)

    def __getattr__(self, name):
        real = getattr(self._real, name)
        if not callable(real) or not name.startswith("nvml"):
            return real

        def call(*args):
            plain_args = [({"handle": self._token(a)} if type(a).__name__.startswith("LP_") else self._plain(a))
                          for a in args]
            start = time.monotonic()
            try:
                result = real(*args)
            except self._real.NVMLError as exc:
                self.calls.append({"f": name, "args": plain_args, "error": type(exc).__name__,
                                   "value": getattr(exc, "value", None),
                                   "s": round(time.monotonic() - start, 6)})
                raise
            self.calls.append({"f": name, "args": plain_args, "result": self._plain(result),
                               "s": round(time.monotonic() - start, 6)})
            return result
        return call


def main():
    recorder = Recorder(pynvml)
    start = time.monotonic()
    facts = collect_nvml(recorder)
    elapsed = time.monotonic() - start
    json.dump({"elapsed_s": round(elapsed, 4), "calls": recorder.calls, "facts": facts},
              sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
