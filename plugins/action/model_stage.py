# -*- coding: utf-8 -*-
# Copyright (c) llmfleet maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Action plugin of model_stage: a ``src`` directory on the control node.

The target first says, in a check-mode pass, which files it still needs (a re-run of a published
release needs none, so nothing is transferred). Only those are sent, with the connection's own
file transfer, into the remote temp dir under their release paths, and the module stages them from
there like a directory on the target (hash, verify, publish, switch). Every other source goes
straight to the module.
"""

from __future__ import annotations

import os

from ansible.errors import AnsibleActionFail
from ansible.module_utils.parsing.convert_bool import boolean
from ansible.plugins.action import ActionBase

from ansible_collections.llmfleet.serving.plugins.module_utils._stage import DirSource

MODULE = "llmfleet.serving.model_stage"


class ActionModule(ActionBase):
    TRANSFERS_FILES = True
    # async for the mirror, peer, target-directory and Hub sources (the module does all the work);
    # a control-node directory is transferred by this plugin and runs in place.
    _supports_async = True

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        args = dict(self._task.args)
        if not args.get("src") or boolean(args.get("remote_src", False), strict=False):
            wrap_async = self._task.async_val and not self._connection.has_native_async
            result.update(self._execute_module(module_name=MODULE, module_args=args, task_vars=task_vars,
                                               wrap_async=wrap_async))
            return result
        if self._task.async_val:
            raise AnsibleActionFail("async is not supported with src on the control node: the files are "
                                    "transferred by the task itself")

        try:
            src = self._find_needle("files", args["src"])
            if not os.path.isdir(src):
                raise AnsibleActionFail("src %s on the control node is not a directory" % src)
            if not args.get("manifest"):
                args["manifest"] = DirSource(src).fetch_manifest(args.get("name"), args.get("revision"))
        except ValueError as e:
            raise AnsibleActionFail(str(e))

        # The check-mode pass opens no source file, so the target-side src is only a placeholder.
        args.update(src=src, remote_src=True)
        plan = self._plan(args, task_vars)
        if plan.get("failed") or self._task.check_mode or not plan.get("fetch_paths"):
            if not plan.get("failed") and not self._task.check_mode:
                # Nothing to transfer: the real run still verifies, switches and prunes.
                plan = self._execute_module(module_name=MODULE, module_args=args, task_vars=task_vars)
            result.update(plan)
            return result

        shell = self._connection._shell
        tmpdir = shell.tmpdir or self._make_tmp_path()
        try:
            paths = plan["fetch_paths"]
            subdirs = sorted({os.path.dirname(p) for p in paths} - {""})
            if subdirs:
                cmd = "mkdir -p -- %s" % " ".join(shell.quote(shell.join_path(tmpdir, d)) for d in subdirs)
                res = self._low_level_execute_command(cmd, sudoable=False)
                if res["rc"] != 0:
                    raise AnsibleActionFail("cannot create directories in %s: %s" % (tmpdir, res["stderr"]))
            remote = [shell.join_path(tmpdir, p) for p in paths]
            for path, dest in zip(paths, remote):
                self._transfer_file(os.path.join(src, *path.split("/")), dest)
            self._fixup_perms2([tmpdir] + [shell.join_path(tmpdir, d) for d in subdirs] + remote, execute=False)
            args["src"] = tmpdir
            result.update(self._execute_module(module_name=MODULE, module_args=args, task_vars=task_vars))
        finally:
            self._remove_tmp_path(tmpdir)
        return result

    def _plan(self, args, task_vars):
        """Run the module in check mode whatever the task's mode: it reports what the target lacks."""
        check_mode = self._task.check_mode
        self._task.check_mode = True
        try:
            return self._execute_module(module_name=MODULE, module_args=args, task_vars=task_vars)
        finally:
            self._task.check_mode = check_mode
