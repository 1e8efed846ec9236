"""Checks of every path a user gives, before any process group starts or any file is written.

Each problem is one ConfigError naming the field: missing, a folder where a file is expected
(or the other way round), not a regular file, no permission, unreadable. Files are opened and
one byte is read (a real read, so what `os.access` cannot see -- ACLs, root on a read-only
export -- still shows); folders are listed. The output folder may not exist yet: then the
nearest existing folder above it must be writable. `os.access` answers for the real user, so
as root (who may read and write anything) only the read-only file system is refused there.

A disk that fills or a folder that becomes unwritable while the job runs cannot be seen here;
the job's writers turn that into `OutputWriteError` (moe_ep/job.py) and keep what was finished.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Callable, Optional

from .config import Config, ConfigError


def _exists(path: str) -> bool:
    try:
        return os.path.lexists(path)
    except (ValueError, OSError):   # embedded NUL byte, name too long
        return False


def _why(err: OSError) -> str:
    return err.strerror or type(err).__name__


def check_readable_file(field: str, path: str, what: str = "file") -> None:
    """`path` must be a regular file this process can open and read."""
    if not _exists(path):
        raise ConfigError(field, path, f"{what} not found")
    if not os.path.exists(path):
        raise ConfigError(field, path, f"is a broken symbolic link (to {os.readlink(path)!r}), must be a {what}")
    if os.path.isdir(path):
        raise ConfigError(field, path, f"is a folder, must be a {what}")
    if not os.path.isfile(path):
        raise ConfigError(field, path, f"is not a regular file (a device, pipe or socket), must be a {what}")
    if not os.access(path, os.R_OK):
        raise ConfigError(field, path, "cannot be read: no read permission")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as err:
        raise ConfigError(field, path, f"cannot be read: {_why(err)}") from None


def check_readable_folder(field: str, path: str, what: str = "folder") -> None:
    """`path` must be a folder this process can list and enter."""
    if not _exists(path):
        raise ConfigError(field, path, f"{what} not found")
    if not os.path.exists(path):
        raise ConfigError(field, path, f"is a broken symbolic link (to {os.readlink(path)!r}), must be a {what}")
    if not os.path.isdir(path):
        raise ConfigError(field, path, f"is a file, must be a {what}")
    if not os.access(path, os.R_OK | os.X_OK):
        raise ConfigError(field, path, "cannot be read: no read permission")
    try:
        os.listdir(path)
    except OSError as err:
        raise ConfigError(field, path, f"cannot be read: {_why(err)}") from None


def _nearest_existing(path: str) -> str:
    """The path itself or the closest folder above it that exists."""
    p = os.path.abspath(path)
    while not _exists(p):
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    return p


def check_output_folder(field: str, path: str) -> None:
    """`path` must be a writable folder, or creatable: nothing on the way is a file and the
    nearest existing folder above it is writable. Creates nothing."""
    try:
        os.fspath(path).encode()
        if "\0" in path:
            raise ValueError("embedded NUL byte")
    except (ValueError, UnicodeError) as err:
        raise ConfigError(field, path, f"is not a usable path ({err})") from None
    base = _nearest_existing(path)
    if _exists(base) and not os.path.exists(base):
        raise ConfigError(field, path, f"'{base}' is a broken symbolic link")
    if not os.path.isdir(base):
        if os.path.abspath(base) == os.path.abspath(path):
            raise ConfigError(field, path, "is a file, must be a folder (or not exist yet)")
        raise ConfigError(field, path, f"cannot be created: '{base}' is a file, not a folder")
    if not os.access(base, os.W_OK | os.X_OK):
        if os.path.abspath(base) == os.path.abspath(path):
            raise ConfigError(field, path, "cannot be written: no write permission (or a read-only file system)")
        raise ConfigError(field, path, f"cannot be created: no write permission in '{base}' "
                                       "(or a read-only file system)")
    try:   # the names still to be made, against the limit of the file system they will be made on
        name_max = os.pathconf(base, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        name_max = -1
    new_parts = os.path.relpath(os.path.abspath(path), os.path.abspath(base)).split(os.sep) \
        if os.path.abspath(path) != os.path.abspath(base) else []
    for part in new_parts if name_max > 0 else []:
        if len(os.fsencode(part)) > name_max:
            raise ConfigError(field, path, f"has a name of {len(os.fsencode(part))} bytes; the file system takes "
                                           f"at most {name_max}")
    for name, want_folder in RUN_OUTPUTS.items():   # what a run writes there, if an earlier run left it
        inside = os.path.join(path, name)
        if os.path.lexists(inside) and (os.path.isdir(inside) != want_folder or os.path.islink(inside)
                                        and not os.path.exists(inside)):
            raise ConfigError(field, path, f"holds '{name}', which is not a {'folder' if want_folder else 'file'}; "
                                           f"the run writes its {'images' if want_folder else 'file'} there")


# what a run writes under output_dir: name -> is a folder
RUN_OUTPUTS = {"images": True, "stats.json": False, "summary.json": False, "metrics.jsonl": False,
               "manifest.jsonl": False}


def check_text_encoder_module(field: str, spec: str) -> None:
    """'package.module:function': the module's file must be found and readable (the import
    itself is tried by the model's preflight, which names the same field)."""
    module_name = spec.partition(":")[0]
    try:
        found = importlib.util.find_spec(module_name)
    except (ImportError, ValueError) as err:       # a parent that is a module, not a package
        raise ConfigError(field, spec, f"cannot import module '{module_name}' ({err})") from None
    except Exception as err:  # noqa: BLE001 - a parent package that fails while importing
        raise ConfigError(field, spec, f"cannot import module '{module_name}' ({type(err).__name__}: {err})") from None
    if found is None:
        raise ConfigError(field, spec, f"cannot import module '{module_name}' (not found on sys.path / PYTHONPATH)")
    origin: Optional[str] = found.origin if found.has_location else None
    if origin and os.path.isfile(origin) and not os.access(origin, os.R_OK):
        raise ConfigError(field, spec, f"cannot import module '{module_name}': no read permission on {origin}")


def import_function(field: str, spec: str) -> Callable:
    """'package.module:function' -> the function; raises ConfigError naming `field`."""
    module_name, _, func_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # ImportError, or anything the module raises while importing
        raise ConfigError(field, spec, f"cannot import module '{module_name}' ({err})") from None
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise ConfigError(field, spec, f"module '{module_name}' has no function '{func_name}'")
    return fn


# the fields check_paths reads: their files are this node's, so another node may see them differently
PATH_FIELDS = ("output_dir", "model.checkpoint", "model.path", "model.text_encoder", "eplb.stats_file",
               "eplb.placement_file", "sampling.prompts_file")


def check_paths(cfg: Config) -> None:
    """Every path of the config (raises ConfigError naming the first bad one)."""
    m, e = cfg.model, cfg.eplb
    check_output_folder("output_dir", cfg.output_dir)
    if m.checkpoint:
        check_readable_file("model.checkpoint", m.checkpoint)
    if m.type == "diffusers" and m.path:
        check_readable_folder("model.path", m.path, "diffusers model folder")
    if m.text_encoder != "builtin":
        check_text_encoder_module("model.text_encoder", m.text_encoder)
    if e.stats_file:
        check_readable_file("eplb.stats_file", e.stats_file)
    if e.placement_file:
        check_readable_file("eplb.placement_file", e.placement_file)
    if cfg.sampling.prompts_file:
        check_readable_file("sampling.prompts_file", cfg.sampling.prompts_file)
