"""Where a manifest may make the job read from: allowed input locations for image URIs.

A manifest is data from someone else; its ``image_uri`` values must not turn the job into a file reader
for the machine or a bucket it happens to have credentials for. An input URI is accepted only under one
of the spec's ``allowed_input_prefixes``; when that list is empty, the only allowed prefix is the folder
that holds the manifest. Checks run on the normalised location:

1. relative paths are taken relative to the manifest's folder, wherever it is (``img/a.png`` beside
   ``s3://bucket/jobs/m.parquet`` is ``s3://bucket/jobs/img/a.png``);
2. local paths are resolved (``..`` and symlinks), so ``allowed/../../etc/passwd`` or a symlink out of
   the folder is judged by where it really points;
3. remote paths must not contain ``..`` segments (plain or URL-encoded) at all, since object stores do not
   resolve them but some gateways do;
4. the protocol must match (``file`` and bare paths are the same), then the path must equal the prefix or
   continue it after a ``/``.
"""

from __future__ import annotations

import glob
import os
import posixpath
import urllib.parse

import fsspec

LOCAL_PROTOCOLS = ("file", "local")


class InputLocationError(ValueError):
    """An input URI outside the allowed locations (or malformed)."""


def _split(uri: str) -> tuple[str, str]:
    """(protocol, path) with ``file``/``local``/bare paths as ``file`` and remote paths in the filesystem's
    own form (``memory://x/a`` and ``memory:///x/a`` are the same object: ``/x/a``)."""
    protocol, path = fsspec.core.split_protocol(uri)
    protocol = (protocol or "file").lower()
    if protocol in LOCAL_PROTOCOLS:
        return "file", path
    try:
        path = fsspec.get_filesystem_class(protocol)._strip_protocol(uri)
    except Exception:  # driver not installed here: compare the paths as written
        pass
    return protocol, path


def _is_relative(uri: str) -> bool:
    """A bare path that is not absolute (no protocol): relative to the manifest's folder."""
    return fsspec.core.split_protocol(uri)[0] is None and not os.path.isabs(uri)


def manifest_folder(manifest_uri: str, storage_options: dict | None = None) -> str:
    """The folder holding a manifest file (a folder manifest is its own folder; a glob's is the folder
    above its first wildcard: ``s3://b/jobs/*/m.csv`` -> ``s3://b/jobs``)."""
    protocol, path = _split(manifest_uri)
    if glob.has_magic(path):
        fixed = path[:min(path.index(c) for c in "*?[" if c in path)]
        folder = fixed[:fixed.rfind("/")] if "/" in fixed else ""
        if protocol == "file":
            return os.path.realpath(folder or ".")
        return f"{protocol}://{folder}"
    if protocol == "file":
        real = os.path.realpath(path)
        return real if os.path.isdir(real) else os.path.dirname(real)
    fs, root = fsspec.core.url_to_fs(manifest_uri, **(storage_options or {}))
    folder = root if fs.isdir(root) else posixpath.dirname(root.rstrip("/"))
    return f"{protocol}://{folder}"


def manifest_folders(manifest: str | list[str], storage_options: dict | None = None) -> list[str]:
    """The folder of every entry of a manifest (a URI or a list of URIs), in order, without repeats."""
    uris = [manifest] if isinstance(manifest, str) else manifest
    return list(dict.fromkeys(manifest_folder(u, storage_options) for u in uris))


def normalise(uri: str, base: str | None = None) -> str:
    """The location ``uri`` really names (see module docstring, steps 1-3); raises on ``..`` remotely."""
    if not isinstance(uri, str) or not uri.strip():
        raise InputLocationError(f"must be a non-empty URI string, got {uri!r}")
    if "\x00" in uri:
        raise InputLocationError("contains a NUL byte")
    if _is_relative(uri):
        if base is None:
            raise InputLocationError(f"a relative path needs a manifest folder to be relative to, got {uri!r}")
        if _split(base)[0] != "file":  # a remote manifest: the path continues its folder
            uri = base.rstrip("/") + "/" + uri
    protocol, path = _split(uri)
    if protocol == "file":
        if not os.path.isabs(path):
            path = os.path.join(_split(base)[1], path)
        return os.path.realpath(path)
    segments = urllib.parse.unquote(urllib.parse.unquote(path)).replace("\\", "/").split("/")
    if ".." in segments or "." in segments:
        raise InputLocationError(f"must not contain '.' or '..' segments, got {uri!r}")
    return f"{protocol}://{path}"


def is_under(location: str, prefix: str) -> bool:
    """Whether normalised ``location`` equals normalised ``prefix`` or lies below it."""
    lp, lpath = _split(location)
    pp, ppath = _split(prefix)
    if lp != pp:
        return False
    ppath = ppath.rstrip("/")
    return lpath == ppath or lpath.startswith(ppath + "/")


def allowed_prefixes(spec_prefixes: list[str], manifest_uri: str | list[str] | None,
                     storage_options: dict | None = None) -> list[str]:
    """The normalised allowed prefixes: the spec's list, else the manifest's folder(s)."""
    if spec_prefixes:
        return [normalise(p) if _split(p)[0] != "file" else os.path.realpath(_split(p)[1]) for p in spec_prefixes]
    if manifest_uri is None:
        return []
    return manifest_folders(manifest_uri, storage_options)


def input_rules(spec) -> tuple[list[str], str | None]:
    """(allowed prefixes, base folder for relative paths) of a job spec (``spec.manifest`` may be None).

    A manifest of several URIs allows every entry's folder; relative paths are taken from the first
    entry's folder (rows do not remember which file they came from)."""
    folders = manifest_folders(spec.manifest, spec.storage_options) if spec.manifest else []
    base = folders[0] if folders else None
    if spec.allowed_input_prefixes:
        return allowed_prefixes(spec.allowed_input_prefixes, None), base
    return folders, base  # allowed_prefixes' default, without looking the folders up twice


def check_input_uri(uri: str, allowed: list[str], base: str | None = None) -> str:
    """Return the normalised location of ``uri`` if it lies under an allowed prefix, else raise
    :class:`InputLocationError` saying which prefixes are allowed. ``base``: the manifest folder."""
    location = normalise(uri, base)
    if not any(is_under(location, prefix) for prefix in allowed):
        shown = ", ".join(allowed) or "(none)"
        raise InputLocationError(f"outside the allowed input locations [{shown}] (set allowed_input_prefixes "
                                 f"in the spec to allow more), got {uri!r}")
    return location
