"""Luna Daemon: one process that keeps VAE / CLIP / LoRA loaded and serves them over localhost."""


def _version() -> str:
    """``[project] version`` of pyproject.toml, the one place it is written.

    A source tree (a clone in ComfyUI/custom_nodes, an editable install) reads the file
    beside this package, so an edit shows without reinstalling; an installed wheel has no
    such file and reads its own metadata. Standard library only (the CLI's start-up cost).
    """
    from pathlib import Path

    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    try:
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10: the tomli dependency
            import tomli as tomllib
        with pyproject.open("rb") as fh:
            project = tomllib.load(fh).get("project", {})
        if project.get("name") == "luna-daemon" and project.get("version"):
            return str(project["version"])
    except (OSError, ValueError, ImportError):
        pass  # no such file (a wheel), or another project's: the metadata below
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("luna-daemon")
    except PackageNotFoundError:
        return "0+unknown"  # a bare copy of the package, neither installed nor in its tree


__version__ = _version()
