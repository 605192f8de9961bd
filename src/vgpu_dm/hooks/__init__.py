"""Hooks: programs an operator has apply run before and after it changes the host (nvidia-mig-parted's
idea, reference/kvm-host.md §F): the file format in ``spec``, running them in ``runner``."""

from vgpu_dm.hooks.spec import HOOK_NAMES, Hook, HooksFile, read_hooks_file

__all__ = ["HOOK_NAMES", "Hook", "HooksFile", "read_hooks_file"]
