"""The help text of every setting (pure data): the dashboard's Settings page shows it and
README.md's settings table is generated from it."""

from __future__ import annotations

import re

# One line of help per setting, the single source of it: the dashboard's Settings page
# shows it under each field and README.md's settings table is this table
# (``settings_table()``; tests/test_settings_help.py fails when they differ). Each value is
# (default as the README shows it, meaning); Markdown is allowed (``help_text`` strips it).
HELP: dict[str, tuple[str, str]] = {
    "host": ("`127.0.0.1`", "address of all three ports"),
    "port": ("19283", "the model server's TCP port (Luna protocol v1); see Ports"),
    "monitor_port": ("19285", "the dashboard's port (`/healthz`, `/metrics`, `/ws`); see Ports"),
    "lock_port": ("19299", "single-instance lock port; see Ports"),
    "max_header_bytes": ("1 MiB", "protocol limit: largest JSON header of one message"),
    "max_body_bytes": ("2 GiB", "protocol limit: largest binary body (tensors) of one message"),
    "frame_timeout": ("30 s", "a started frame must complete within this"),
    "idle_timeout": ("300 s", "idle connections close after this"),
    "max_connections": ("64", "open connections; when full, a newcomer evicts the longest-idle one "
                              "(see [protocol](docs/protocol.md#connection-limits-and-eviction))"),
    "queue_size": ("16", "queued calls per model before `busy`"),
    "client_timeout": ("120 s", "how long a client waits for an answer"),
    "stop_timeout": ("30 s", "stop deadline for in-flight work (a stop takes at most `stop_timeout` + 3 s)"),
    "shm": ("true", "shared memory for big tensors between the daemon and clients on this host "
                    "([docs/protocol.md](docs/protocol.md#shared-memory)); false: TCP only"),
    "huge_pages": ("true", "Linux: the daemon's tensors of 2 MiB and more use transparent huge pages (PyTorch's "
                           "`THP_MEM_ALLOC_ENABLE`): ~10x fewer page faults per decode; the kernel must allow it "
                           "(`/sys/kernel/mm/transparent_hugepage/enabled` not `never`); `status` and `doctor` say "
                           "whether it is active; takes effect on a restart"),
    "service": ("`full`", "`full`, `vae` (VAE ops only) or `clip`"),
    "engine": ("`auto`", "`comfy` (ComfyUI's own code, exact parity), `standalone` (diffusers + transformers), "
                         "`auto` = comfy when ComfyUI is found"),
    "comfyui_root": ("—", "ComfyUI folder (also `COMFYUI_PATH`; detected when this repo is in `ComfyUI/custom_nodes/`)"),
    "model_roots": ("`[]`", "folders models may be loaded from (plus `<comfyui_root>/models`); anything else is "
                            "`forbidden_path`; a filesystem root, your home folder or a folder above it is refused"),
    "vae_device": ("`auto`", "device VAEs load on: `auto`, `cpu`, `cuda`, `cuda:N`, `mps`; an unavailable device is "
                             "an error listing the real ones"),
    "clip_device": ("`auto`", "device CLIP text encoders load on; the same choices as `vae_device`"),
    "vae_dtype": ("`auto`", "VAE precision: `auto`, `fp32`, `fp16`, `bf16`"),
    "clip_dtype": ("`auto`", "CLIP precision: `auto`, `fp32`, `fp16`, `bf16`"),
    "keep_alive": ("`forever`", "how long an idle model stays loaded (`30m`, `1h`); `0` = unload after use; "
                                "a request may override it"),
    "max_model_bytes": ("`{}`", "memory budget per device, e.g. `{cpu = \"16GiB\", \"cuda:0\" = \"8GiB\"}`; counts "
                                "weights plus the standalone engine's LoRA-patched weight copies; idle models are "
                                "evicted LRU (on a load, or when an encode grew the copies past it), never one in use"),
    "lora_cache_bytes": ("`1GiB`", "LoRA cache budget (LRU; a LoRA larger than the budget is refused without "
                                   "evicting anything)"),
    "preload": ("`[]`", "models to load at start: `\"vae:<path>\"`, `\"clip:<type>:<path>[,<path>]\"`"),
    "warm_start": ("`false`", "reload the models of the previous run at start"),
    "log_level": ("`INFO`", "`DEBUG` … `ERROR`"),
    "health_interval": ("5 s", "tray health probe (`ping`) period"),
    "autostart_daemon": ("`true`", "the tray starts the daemon after launch"),
    "autostart_delay": ("1 s", "how long after launch the tray starts the daemon"),
    "notifications": ("`true`", "tray notifications for errors and warnings"),
    "allowed_origins": ("`[]`", "extra browser origins allowed on the dashboard WebSocket"),
    "comfy_fallback": ("`error`", "ComfyUI nodes when the daemon is down: `error` or `local`"),
    "start_daemon_if_missing": ("`false`", "ComfyUI nodes start the daemon with ComfyUI's Python (tray, or serve "
                                           "without a display) when it is down"),
    "instances": ("none", "`[[instances]]` tables: several daemons from one tray / `serve` host, see below; file only"),
    "config_dir": ("platformdirs (or `LUNA_HOME/…`)", "where the config file and token live"),
    "log_dir": ("platformdirs (or `LUNA_HOME/…`)", "where the log files live"),
    "state_dir": ("platformdirs (or `LUNA_HOME/…`)", "where the warm-start state lives"),
}
_MD_LINK = re.compile(r"\[([^\]]*)\]\([^)]*\)")


def help_text(key: str) -> str:
    """The help of ``key`` as plain text (no Markdown); "" for a key without help."""
    entry = HELP.get(key)
    return _MD_LINK.sub(r"\1", entry[1]).replace("`", "") if entry else ""


def settings_table() -> str:
    """README.md's settings table (Markdown), one row per key, from ``HELP``."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    rows += [f"| `{key}` | {default} | {meaning} |" for key, (default, meaning) in HELP.items()]
    return "\n".join(rows) + "\n"
