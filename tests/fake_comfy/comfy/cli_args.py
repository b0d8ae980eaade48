"""ComfyUI's command-line flags (the subset the fake's modules read).

At import the parser runs on ``sys.argv`` only if ``comfy.options.enable_args_parsing()`` was
called first; otherwise on an empty list, so every flag keeps its default. Modules read
``args`` at their own import time, so flags must be changed before importing them.
An argv entry this parser does not know makes argparse exit the process (like ComfyUI).
"""

import argparse

import comfy.options

parser = argparse.ArgumentParser()

parser.add_argument("--listen", type=str, default="127.0.0.1", metavar="IP", nargs="?", const="0.0.0.0,::")
parser.add_argument("--port", type=int, default=8188)
parser.add_argument("--base-directory", type=str, default=None)
parser.add_argument("--output-directory", type=str, default=None)
parser.add_argument("--input-directory", type=str, default=None)
parser.add_argument("--temp-directory", type=str, default=None)
parser.add_argument("--user-directory", type=str, default=None)
parser.add_argument("--extra-model-paths-config", type=str, default=None, nargs="+", action="append")

parser.add_argument("--cuda-device", type=int, default=None, metavar="DEVICE_ID")
parser.add_argument("--default-device", type=int, default=None, metavar="DEFAULT_DEVICE_ID")
parser.add_argument("--cuda-malloc", action="store_true")
parser.add_argument("--disable-cuda-malloc", action="store_true")

fp_group = parser.add_mutually_exclusive_group()
fp_group.add_argument("--force-fp32", action="store_true")
fp_group.add_argument("--force-fp16", action="store_true")

fpvae_group = parser.add_mutually_exclusive_group()
fpvae_group.add_argument("--fp16-vae", action="store_true")
fpvae_group.add_argument("--fp32-vae", action="store_true")
fpvae_group.add_argument("--bf16-vae", action="store_true")
parser.add_argument("--cpu-vae", action="store_true")

fpte_group = parser.add_mutually_exclusive_group()
fpte_group.add_argument("--fp8_e4m3fn-text-enc", action="store_true")
fpte_group.add_argument("--fp8_e5m2-text-enc", action="store_true")
fpte_group.add_argument("--fp16-text-enc", action="store_true")
fpte_group.add_argument("--fp32-text-enc", action="store_true")
fpte_group.add_argument("--bf16-text-enc", action="store_true")

vram_group = parser.add_mutually_exclusive_group()
vram_group.add_argument("--gpu-only", action="store_true")
vram_group.add_argument("--highvram", action="store_true")
vram_group.add_argument("--normalvram", action="store_true")
vram_group.add_argument("--lowvram", action="store_true")
vram_group.add_argument("--novram", action="store_true")
vram_group.add_argument("--cpu", action="store_true")

parser.add_argument("--reserve-vram", type=float, default=None)
parser.add_argument("--disable-smart-memory", action="store_true")
parser.add_argument("--disable-mmap", action="store_true")
parser.add_argument("--mmap-torch-files", action="store_true")
parser.add_argument("--fast", nargs="*", type=str, default=None)
parser.add_argument("--disable-all-custom-nodes", action="store_true")
parser.add_argument("--whitelist-custom-nodes", type=str, nargs="+", default=[])
parser.add_argument("--verbose", default="INFO", const="DEBUG", nargs="?",
                    choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"])

if comfy.options.args_parsing:
    args = parser.parse_args()
else:
    args = parser.parse_args([])

# Post-processing of a few flags, as ComfyUI does after parsing.
if args.fast is None:
    args.fast = set()
elif args.fast == []:
    args.fast = {"all"}
else:
    args.fast = set(args.fast)
if args.force_fp16:
    args.fp16_unet = True
