"""One settings object for every part of Luna Daemon.

Precedence (lowest to highest): built-in defaults < TOML file < ``LUNA_*`` environment
variables < explicit overrides (CLI flags). ``Settings.sources`` records, for every key,
which of those layers supplied the effective value (``luna-daemon config --show``).

Paths: by default config, token, logs and state live in the platformdirs user folders.
``LUNA_HOME=<dir>`` puts all of them under one folder (``<dir>/config``, ``<dir>/logs``,
``<dir>/state``) so that tests and side-by-side installs never touch each other.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import secrets

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 (some ComfyUI installs)
    import tomli as tomllib  # type: ignore[no-redef]
from dataclasses import dataclass, field, fields
from pathlib import Path, PurePath
from typing import Any, Callable, Iterator, Mapping

from luna_daemon import fsutil
from luna_daemon.protocol import ErrorCode, LunaError

APP_NAME = "luna-daemon"
CONFIG_FILE = "config.toml"
TOKEN_FILE = "token"

# Units accepted by byte-size settings ("4GiB", "512 MB", plain integers = bytes).
_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": 1024,
    "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
    "g": 1000**3, "gb": 1000**3, "gib": 1024**3,
    "t": 1000**4, "tb": 1000**4, "tib": 1024**4,
}
_DURATION_UNITS = {"": 1.0, "s": 1.0, "ms": 0.001, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}

FOREVER = -1.0  # keep_alive value meaning "never unload"


class SettingsError(ValueError):
    """A setting has an invalid value. ``key`` names it; ``message`` says what is allowed.

    When the value came from the config file, ``file`` and ``line`` (1-based; 0 = not known)
    locate it; for an unknown key ``suggestion`` is the known key it was probably meant to
    be. ``str()`` is ``[<file>[ line <n>]: ]<key>: <message>[ (did you mean '<key>'?)]``."""

    def __init__(self, key: str, message: str, *, file: str | os.PathLike = "", line: int = 0, suggestion: str = ""):
        self.key, self.message = key, message
        self.file, self.line, self.suggestion = str(file), line, suggestion
        where = f"{self.file} line {line}: " if self.file and line else (f"{self.file}: " if self.file else "")
        hint = f" (did you mean {suggestion!r}?)" if suggestion else ""
        super().__init__(f"{where}{key}: {message}{hint}")

    def located(self, file: str | os.PathLike, line: int) -> "SettingsError":
        """The same error, placed in ``file`` at ``line``."""
        return SettingsError(self.key, self.message, file=file, line=line, suggestion=self.suggestion)


def problems_text(problems: list[SettingsError]) -> str:
    """Problems as one line, the file named once per run of errors in it:
    ``/x/config.toml line 2: port: ...; line 3: kep_alive: ...``."""
    out: list[str] = []
    last = None
    for p in problems:
        text = str(p)
        if p.file and p.file == last:
            text = text[len(p.file):].lstrip(": ")
        out.append(text)
        last = p.file
    return "; ".join(out)


def _suggest(key: str, known: Any) -> str:
    """The known key an unknown ``key`` was probably meant to be ("" if none is close)."""
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return close[0] if close else ""


_KEY_LINE = re.compile(r"""\s*(?:\[\s*)?(["']?)([A-Za-z0-9_.-]+)\1\s*(?:=|\])""")
_ARRAY_TABLE_LINE = re.compile(r"""\s*\[\[\s*(["']?)([A-Za-z0-9_-]+)\1\s*\]\]""")


def _key_lines(text: str) -> dict[str, int]:
    """Line (1-based) of each top-level key of a TOML text (``a = 1`` or a ``[a]`` table);
    the n-th ``[[a]]`` table (1-based) is ``a[n]`` and its keys ``a[n].key``.
    A plain scan, not a parser: it runs only on text tomllib already accepted, and a key it
    cannot place gets line 0 (the error then names the file and the key)."""
    out: dict[str, int] = {}
    in_table = False
    array_table = ""  # "instances[2]" while below the second [[instances]] header
    counts: dict[str, int] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        m = _ARRAY_TABLE_LINE.match(raw)
        if m:
            name = m.group(2).replace("-", "_")
            counts[name] = counts.get(name, 0) + 1
            in_table, array_table = True, f"{name}[{counts[name]}]"
            out.setdefault(name, n)
            out[array_table] = n
            continue
        m = _KEY_LINE.match(raw)
        if not m:
            continue
        name = m.group(2).split(".")[0].replace("-", "_")
        if stripped.startswith("["):
            in_table, array_table = True, ""  # keys below a table header belong to that table
            out.setdefault(name, n)
        elif array_table:
            out.setdefault(f"{array_table}.{name}", n)
        elif not in_table:
            out.setdefault(name, n)
    return out


def _line_of(lines: dict[str, int], key: str) -> int:
    """The line of ``key`` or of the nearest enclosing key it has (``instances[2].port`` ->
    its line, else the table's header; ``max_model_bytes.cpu`` -> ``max_model_bytes``)."""
    while key:
        if key in lines:
            return lines[key]
        key = key.rsplit(".", 1)[0] if "." in key else (key.split("[")[0] if "[" in key else "")
    return 0


def _field_of(key: str) -> str:
    """The Settings field an error key belongs to (``instances[2].port`` -> ``instances``)."""
    return re.split(r"[.\[]", key, maxsplit=1)[0]


def _decode_error_line(exc: Exception) -> int:
    line = getattr(exc, "lineno", None)  # Python >= 3.14
    if isinstance(line, int):
        return line
    m = re.search(r"line (\d+)", str(exc))
    return int(m.group(1)) if m else 0


# Syntax errors one tolerant load steps over (each costs a parse of a <= 1 MiB file).
MAX_SYNTAX_ERRORS = 16


def _parse_toml(text: str, path: Path, bad: Callable[[SettingsError], None]) -> dict[str, Any] | None:
    """The file's table; for each syntax error ``bad`` is called with the located error.
    Strict callers raise there; a tolerant one gets the file without the broken lines (each
    blanked and parsed again), so one typo does not also lose host, port and model_roots.
    None if the error cannot be placed on a line (then nothing of the file is used)."""
    lines = text.splitlines()
    for _ in range(MAX_SYNTAX_ERRORS):
        try:
            return tomllib.loads("\n".join(lines))
        except tomllib.TOMLDecodeError as exc:
            line = _decode_error_line(exc)
            hint = "; text values need quotes, e.g. keep_alive = \"10m\"" if ("Invalid value" in str(exc) or "Expected newline" in str(exc)) else ""
            bad(SettingsError(_key_at("\n".join(lines), line) or "config_file", f"not valid TOML ({exc}){hint}",
                              file=path, line=line))
            if not 1 <= line <= len(lines) or not lines[line - 1].strip():
                return None
            lines[line - 1] = ""  # same line numbers for the errors after it
    return None


def _key_at(text: str, line: int) -> str:
    """The key written on ``line`` of ``text`` ("" if that line has none)."""
    lines = text.splitlines()
    if not 1 <= line <= len(lines):
        return ""
    m = _KEY_LINE.match(lines[line - 1])
    return m.group(2).replace("-", "_") if m else ""


def parse_size(value: Any, key: str = "size") -> int:
    """``1073741824``, ``"1GiB"``, ``"512 MB"`` -> bytes (int, >= 0)."""
    if isinstance(value, bool):
        raise SettingsError(key, "expected a byte size")
    if isinstance(value, (int, float)):
        if value < 0:
            raise SettingsError(key, "must be >= 0")
        return int(value)
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise SettingsError(key, f"expected a byte size like 4GiB or 512MB, got {value!r}")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


def parse_duration(value: Any, key: str = "duration") -> float:
    """Seconds from ``30``, ``"30s"``, ``"5m"``, ``"1h"``; ``"forever"`` / negative -> FOREVER."""
    if isinstance(value, bool):
        raise SettingsError(key, "expected a duration")
    if isinstance(value, (int, float)):
        return FOREVER if value < 0 else float(value)
    text = str(value).strip().lower()
    if text in ("forever", "inf", "never", "-1"):
        return FOREVER
    m = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)\s*([a-z]*)", text)
    if not m or m.group(2) not in _DURATION_UNITS:
        raise SettingsError(key, f"expected a duration like 30s, 5m, 1h or 'forever', got {value!r}")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


def _parse_bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise SettingsError(key, f"expected true/false, got {value!r}")


def _parse_list(value: Any, key: str) -> list[str]:
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    text = str(value).strip()
    if not text:
        return []
    if text.startswith("["):
        try:
            parsed = json.loads(text)
        except ValueError as exc:
            raise SettingsError(key, f"not a JSON list: {exc}") from None
        return [str(v) for v in parsed]
    return [p for p in text.split(os.pathsep) if p]


def split_size_pairs(text: str, key: str) -> dict[str, str]:
    """``"cuda:0=8GiB, cpu=16GiB"`` (commas or newlines) -> ``{"cuda:0": "8GiB", "cpu": "16GiB"}``;
    a part that is not ``device=size`` is an error, never skipped."""
    table: dict[str, str] = {}
    for part in re.split(r"[,\n]", text):
        part = part.strip()
        if not part:
            continue
        dev, sep, size = part.partition("=")
        if not sep or not dev.strip() or not size.strip():
            raise SettingsError(key, f"write device=size pairs like cuda:0=8GiB, cpu=16GiB; got {part!r}")
        table[dev.strip()] = size.strip()
    return table


def _parse_size_map(value: Any, key: str) -> dict[str, int]:
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return {}
        try:
            value = json.loads(text)
        except ValueError:
            value = split_size_pairs(text, key)
    if not isinstance(value, Mapping):
        raise SettingsError(key, "expected a table like {\"cuda:0\" = \"8GiB\", cpu = \"16GiB\"}")
    return {str(k): parse_size(v, f"{key}.{k}") for k, v in value.items()}


def too_broad_model_root(root: PurePath, home: PurePath | None) -> str | None:
    """Why the (resolved) folder ``root`` may never be a model root, or None if it may.

    A filesystem root (``/``, ``C:\\``, a UNC share), the home folder itself and every
    folder above it would let a client read any file of the user (SSH keys, browser
    profiles) by naming it a "model". Pure: works for Windows paths on any OS."""
    if root.parent == root:
        return "is a filesystem root"
    if home is not None:
        if root == home:
            return "is your home folder"
        if root in home.parents:
            return "contains your home folder"
    return None


def _resolved(path: str | os.PathLike) -> Path:
    p = Path(path).expanduser()
    try:
        return p.resolve()  # symlinks are judged by what they point to
    except (OSError, RuntimeError):
        return p.absolute()


def _home() -> Path | None:
    try:
        return Path.home().resolve()
    except (OSError, RuntimeError, KeyError):
        return None  # no home folder known: only filesystem roots are refused


_CHOICES = {
    "engine": ("auto", "comfy", "standalone"),
    "service": ("full", "vae", "clip"),
    "vae_dtype": ("auto", "fp32", "fp16", "bf16"),
    "clip_dtype": ("auto", "fp32", "fp16", "bf16"),
    "comfy_fallback": ("error", "local"),
    "log_level": ("DEBUG", "INFO", "WARNING", "ERROR"),
}
_INTERNAL = ("config_file", "sources", "problems", "loaded_with", "instance_name")
_DEVICE_RE = re.compile(r"auto|cpu|mps|cuda(:[0-9]+)?")


def value_kind(key: str) -> str | None:
    """What a setting's number means: ``"duration"`` (seconds; keep_alive -1 = forever),
    ``"size"`` (bytes), ``"size_map"`` (device -> bytes), or None. Parsing and every face's
    display (luna_daemon.units) follow this one rule."""
    if key == "keep_alive" or key.endswith("_timeout") or key in ("health_interval", "autostart_delay"):
        return "duration"
    if key in ("max_body_bytes", "max_header_bytes", "lora_cache_bytes"):
        return "size"
    if key == "max_model_bytes":
        return "size_map"
    return None


@dataclass
class Settings:
    """Every tunable of Luna Daemon. Field docs are shown by ``config --show``."""

    # network
    host: str = "127.0.0.1"
    port: int = 19283
    monitor_port: int = 19285
    lock_port: int = 19299
    # protocol limits
    max_header_bytes: int = 1024 * 1024
    max_body_bytes: int = 2 * 1024**3
    frame_timeout: float = 30.0
    idle_timeout: float = 300.0
    max_connections: int = 64
    queue_size: int = 16
    client_timeout: float = 120.0
    stop_timeout: float = 30.0
    # shared-memory transport for big tensors between processes of this user on this host
    # (docs/protocol.md "Shared memory"); off: every tensor travels in TCP bodies
    shm: bool = True
    # 2 MiB pages for the daemon's big tensors (Linux; hugepages.py): far fewer page
    # faults per decode. Fixed at process start.
    huge_pages: bool = True
    # models
    service: str = "full"
    engine: str = "auto"
    comfyui_root: str = ""
    model_roots: list[str] = field(default_factory=list)
    vae_device: str = "auto"
    clip_device: str = "auto"
    vae_dtype: str = "auto"
    clip_dtype: str = "auto"
    keep_alive: float = FOREVER
    max_model_bytes: dict[str, int] = field(default_factory=dict)
    lora_cache_bytes: int = 1024**3
    preload: list[str] = field(default_factory=list)
    warm_start: bool = False
    # host / faces
    log_level: str = "INFO"
    health_interval: float = 5.0
    autostart_daemon: bool = True
    autostart_delay: float = 1.0
    notifications: bool = True
    allowed_origins: list[str] = field(default_factory=list)
    comfy_fallback: str = "error"
    start_daemon_if_missing: bool = False
    # [[instances]] tables (luna_daemon.instances): validated, file order; [] = one daemon
    instances: list[dict[str, Any]] = field(default_factory=list)
    # where things live (derived from LUNA_HOME / platformdirs unless set)
    config_dir: str = ""
    log_dir: str = ""
    state_dir: str = ""

    # Bookkeeping set by load(): not settable from a file, env or flag.
    config_file: str = field(default="", compare=False)
    sources: dict[str, str] = field(default_factory=dict, repr=False, compare=False)
    # What a tolerant load() could not use (each key then has its default); empty otherwise.
    problems: list[SettingsError] = field(default_factory=list, repr=False, compare=False)
    # load()'s arguments, so that reload() reads the same file, env and flags again.
    loaded_with: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    # The instance these settings are for ("" on a loaded Settings; instances.instance_specs sets it).
    instance_name: str = field(default="", compare=False)

    # ---------------------------------------------------------------- loading
    @classmethod
    def load(
        cls,
        config_file: str | os.PathLike | None = None,
        env: Mapping[str, str] | None = None,
        overrides: Mapping[str, Any] | None = None,
        *,
        tolerant: bool = False,
    ) -> "Settings":
        """Build the effective settings.

        Strict (default): raises the first :class:`SettingsError`, located (``file``,
        ``line``) when the value came from the config file. ``tolerant``: never raises for a
        bad value -- each bad key keeps its default (a file that cannot be read or parsed is
        skipped whole) and every error is listed in ``problems``, for the callers that must
        go on with a broken file: the host (shows it, refuses to start the daemon), the
        read-only CLI commands, ``stop``, ``logs`` and clients (which need only host, port
        and token)."""
        env_map = os.environ if env is None else env
        s = cls()
        s.loaded_with = {"config_file": config_file, "env": env, "overrides": dict(overrides or {})}
        s.sources = {f.name: "default" for f in fields(cls) if f.name not in _INTERNAL}
        s._apply_dirs(env_map)
        path = Path(config_file) if config_file else Path(s.config_dir) / CONFIG_FILE
        s.config_file = str(path)

        def bad(exc: SettingsError) -> None:
            if not tolerant:
                raise exc
            s.problems.append(exc)

        text, data = None, None
        try:  # a regular file of at most fsutil.SMALL_FILE_CAP (a FIFO would hang the start)
            if fsutil.present(path, "config file"):
                text = fsutil.read_small(path, "config file").decode("utf-8")
        except (LunaError, UnicodeDecodeError) as exc:
            bad(SettingsError("config_file", f"cannot read {path}: {getattr(exc, 'message', exc)}"))
        if text is not None:
            data = _parse_toml(text, path, bad)
        if data is not None:
            lines = _key_lines(text or "")
            s._merge(data, "file", strict=True,
                     on_error=lambda e: bad(e.located(path, _line_of(lines, e.key))))
        s._merge({k[5:].lower(): v for k, v in env_map.items() if k.startswith("LUNA_") and k != "LUNA_HOME"}, "env",
                 strict=False, on_error=bad)
        if overrides:
            s._merge({k: v for k, v in overrides.items() if v is not None}, "flag", strict=True, on_error=bad)
        lines = _key_lines(text or "") if data is not None else {}
        if s.instances:
            from luna_daemon.instances import align_primary_port

            exc = align_primary_port(s)
            if exc is not None:
                bad(exc.located(path, _line_of(lines, exc.key)))
        for _ in range(len(s.sources) + 1):  # each round resets one key: bounded
            exc = next(s._invalid(), None)
            if exc is None:
                break
            key = _field_of(exc.key)  # a bad [[instances]] table resets all of them
            if s.sources.get(key) == "file":
                exc = exc.located(path, _line_of(lines, exc.key))
            bad(exc)  # strict: raises
            f = next(f for f in fields(cls) if f.name == key)
            setattr(s, key, f.default if f.default is not dataclasses.MISSING else f.default_factory())  # type: ignore[misc]
            s.sources[key] = "default"
        return s

    def reload(self) -> "Settings":
        """A fresh tolerant :meth:`load` with the same file, env and flags as this one."""
        w = self.loaded_with
        return Settings.load(w.get("config_file"), w.get("env"), w.get("overrides"), tolerant=True)

    def _apply_dirs(self, env: Mapping[str, str]) -> None:
        home = env.get("LUNA_HOME")
        if home:
            base = Path(home).expanduser()
            self.config_dir, self.log_dir, self.state_dir = (str(base / d) for d in ("config", "logs", "state"))
            for k in ("config_dir", "log_dir", "state_dir"):
                self.sources[k] = "env"
            return
        import platformdirs

        self.config_dir = platformdirs.user_config_dir(APP_NAME, appauthor=False)
        self.log_dir = platformdirs.user_log_dir(APP_NAME, appauthor=False)
        self.state_dir = platformdirs.user_state_dir(APP_NAME, appauthor=False)

    def _merge(self, data: Mapping[str, Any], source: str, *, strict: bool,
               on_error: Callable[[SettingsError], None] | None = None) -> None:
        """Coerce and set each key; a bad one raises, or goes to ``on_error`` (the key then
        keeps its previous value) when given."""
        known = {f.name: f for f in fields(self) if f.name not in _INTERNAL}
        for key, raw in data.items():
            key = key.replace("-", "_")
            try:
                if key not in known:
                    if strict:
                        raise SettingsError(key, "unknown setting", suggestion=_suggest(key, known))
                    continue  # unrelated LUNA_* variables are not ours to reject
                if key == "instances":  # tables, checked key by key (each bad one reported)
                    from luna_daemon.instances import parse_tables

                    setattr(self, key, parse_tables(raw, source, on_error))
                else:
                    setattr(self, key, self._coerce(known[key], key, raw))
                self.sources[key] = source
            except SettingsError as exc:
                if on_error is None:
                    raise
                on_error(exc)

    @staticmethod
    def _coerce(f: dataclasses.Field, key: str, raw: Any) -> Any:
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        kind = value_kind(key)
        if kind == "duration":
            return parse_duration(raw, key)
        if kind == "size":
            return parse_size(raw, key)
        if kind == "size_map":
            return _parse_size_map(raw, key)
        if isinstance(default, bool):
            return _parse_bool(raw, key)
        if isinstance(default, int):
            try:
                return int(raw)
            except (TypeError, ValueError):
                raise SettingsError(key, f"expected an integer, got {raw!r}") from None
        if isinstance(default, float):
            try:
                return float(raw)
            except (TypeError, ValueError):
                raise SettingsError(key, f"expected a number, got {raw!r}") from None
        if isinstance(default, list):
            return _parse_list(raw, key)
        return str(raw)

    def validate(self) -> None:
        """Raise SettingsError for the first invalid value."""
        for exc in self._invalid():
            raise exc

    def _invalid(self) -> Iterator[SettingsError]:
        """The invalid values, first one first (fix it and look again: later checks may
        depend on it)."""
        for key, allowed in _CHOICES.items():
            value = getattr(self, key)
            if key == "log_level":
                value = self.log_level = value.upper()
            if value not in allowed:
                yield SettingsError(key, f"must be one of {', '.join(allowed)}; got {value!r}")
        for key in ("port", "monitor_port", "lock_port"):
            if not 0 <= getattr(self, key) <= 65535:
                yield SettingsError(key, "must be a TCP port 0..65535 (0 = pick a free one)")
        for key in ("vae_device", "clip_device"):
            if not _DEVICE_RE.fullmatch(getattr(self, key)):
                yield SettingsError(key, "must be auto, cpu, mps, cuda or cuda:N")
        for key in ("frame_timeout", "idle_timeout", "client_timeout", "stop_timeout"):
            if getattr(self, key) <= 0:
                yield SettingsError(key, "must be a positive duration")
        if not 1024 <= self.max_header_bytes <= 1024 * 1024:
            yield SettingsError("max_header_bytes", "must be between 1 KiB and 1 MiB")
        if self.max_body_bytes < 1024:
            yield SettingsError("max_body_bytes", "must be at least 1 KiB")
        if self.max_connections < 1 or self.queue_size < 1:
            yield SettingsError("max_connections" if self.max_connections < 1 else "queue_size", "must be >= 1")
        if self.instances:
            from luna_daemon.instances import port_problems

            yield from port_problems(self)
        home = _home() if self.model_roots else None
        for root in self.model_roots:
            why = too_broad_model_root(_resolved(root), home)
            if why:
                yield SettingsError("model_roots", f"{root!r} {why}; a model folder must hold model files (e.g. "
                                    "~/ComfyUI/models), never a filesystem root, your home folder or a folder above it")

    # ---------------------------------------------------------------- derived paths
    @property
    def token_path(self) -> Path:
        return Path(self.config_dir) / TOKEN_FILE

    @property
    def log_file(self) -> Path:
        return Path(self.log_dir) / "luna-daemon.log"

    @property
    def state_file(self) -> Path:
        """The warm-start list: ``state.json`` for the primary (or only) instance,
        ``state-<name>.json`` for each further ``[[instances]]`` table (one file each:
        instances restoring from one list would load each other's models)."""
        name = self.instance_name
        if self.instances and name and name != self.instances[0].get("name"):
            return Path(self.state_dir) / f"state-{name}.json"
        return Path(self.state_dir) / "state.json"

    def comfyui_path(self) -> Path | None:
        """The ComfyUI root: ``comfyui_root``, else env ``COMFYUI_PATH``, else the ComfyUI
        this checkout sits in (``ComfyUI/custom_nodes/<repo>/``). None if none is found."""
        candidates = [self.comfyui_root, os.environ.get("COMFYUI_PATH", "")]
        repo = Path(__file__).resolve().parents[1]
        if repo.parent.name == "custom_nodes":
            candidates.append(str(repo.parent.parent))
        for c in candidates:
            if c and (Path(c).expanduser() / "comfy" / "sd.py").is_file():
                return Path(c).expanduser().resolve()
        return None

    def resolved_model_roots(self) -> list[Path]:
        """Configured roots plus ``<ComfyUI>/models`` when a ComfyUI root is known/detected."""
        roots = [Path(r).expanduser() for r in self.model_roots]
        comfy = self.comfyui_path()
        if comfy is not None:
            roots.append(comfy / "models")
        elif self.comfyui_root:
            roots.append(Path(self.comfyui_root).expanduser() / "models")
        out: list[Path] = []
        for r in roots:
            try:
                rp = r.resolve()
            except OSError:
                continue
            if rp not in out:
                out.append(rp)
        return out

    def public_dict(self) -> dict[str, Any]:
        """Every setting as JSON-safe values (no token)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _INTERNAL}

    def with_overrides(self, **overrides: Any) -> "Settings":
        """A copy with some values replaced (validated; marked as 'flag')."""
        new = dataclasses.replace(self, sources=dict(self.sources))
        new._merge(overrides, "flag", strict=True)
        new.validate()
        return new


def load_or_create_token(settings: Settings) -> str:
    """Return the per-install token, creating it (mode 0600) on first use.

    The file is created with O_EXCL so two processes racing on first start agree on one
    token: the loser reads the winner's file.
    """
    path = settings.token_path
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return read_token(settings) or ""
    token = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(token)
    return token


def read_token(settings: Settings) -> str | None:
    """The stored token, or None if there is none yet (a daemon has never run here)."""
    if not fsutil.present(settings.token_path, "token file"):
        return None
    try:
        return fsutil.read_small(settings.token_path, "token file", 4096).decode("ascii").strip() or None
    except LunaError as exc:
        if exc.code == ErrorCode.NOT_FOUND.value:
            return None  # removed just now
        raise
